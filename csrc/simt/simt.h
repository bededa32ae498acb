// The CUDA surface that csrc/cuda kernels see when they are compiled by the host C++ compiler with
// FASTBN_SIMT defined: qualifiers, threadIdx & co., barriers, warp shuffles and votes, atomics, fences,
// intrinsics, and the host runtime that runs a grid with one fiber per CUDA thread.
//
// Kernels include it through csrc/cuda/launch.cuh, never directly.
#pragma once

#include "simt/keywords.h"
#include "simt/thread_context.h"
#include "simt/sync.h"
#include "simt/atomics.h"
#include "simt/intrinsics.h"
#include "simt/runtime.h"
