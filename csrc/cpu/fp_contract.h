// Included first by every .cpp in csrc/cpu. The ReLU mask of the backward recomputes the forward's
// pre-activation and must agree with it bit for bit, across vector bodies, scalar tails and the strided path,
// and across CPU-capability builds of the kernels. GCC contracts a*b+c into an FMA wherever the target has one
// (even with -std=c++17), so some of those would round differently; turning contraction off makes every
// multiply and add round on its own. FMAs wanted for speed are written explicitly (at::vec::fmadd).
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
