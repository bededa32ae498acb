// Names of kernels for error messages, from the address of the kernel function.
//
// dladdr only sees exported symbols, and kernels usually are not (anonymous namespaces, hidden
// visibility), so when it finds no name the ELF symbol table (.symtab) of the object the address lies
// in is searched too. Error path only: nothing here runs unless a launch fails.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "simt/block.h"

namespace fastbn {
namespace simt {
namespace detail {
namespace {

std::string demangle(const char* name) {
  int status = 0;
  char* demangled = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && demangled != nullptr ? demangled : name;
  std::free(demangled);
  return out;
}

// The FUNC symbol of the ELF file `path` whose range holds `offset` (an address relative to the load
// base of a position-independent object); empty when the file has no symbol table.
std::string symtab_lookup(const char* path, std::uintptr_t offset) {
  std::string found;
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return found;
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(ElfW(Ehdr)))) {
    close(fd);
    return found;
  }
  const std::size_t size = static_cast<std::size_t>(st.st_size);
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return found;
  const auto* base = static_cast<const unsigned char*>(map);
  const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
  const bool valid = std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_shoff != 0 &&
                     eh->e_shoff + std::size_t(eh->e_shnum) * sizeof(ElfW(Shdr)) <= size;
  if (valid) {
    const auto* sections = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
    for (unsigned s = 0; s < eh->e_shnum && found.empty(); ++s) {
      if (sections[s].sh_type != SHT_SYMTAB || sections[s].sh_link >= eh->e_shnum) continue;
      const ElfW(Shdr)& strtab = sections[sections[s].sh_link];
      if (sections[s].sh_offset + sections[s].sh_size > size || strtab.sh_offset + strtab.sh_size > size) continue;
      const auto* symbols = reinterpret_cast<const ElfW(Sym)*>(base + sections[s].sh_offset);
      const std::size_t count = sections[s].sh_size / sizeof(ElfW(Sym));
      const char* names = reinterpret_cast<const char*>(base + strtab.sh_offset);
      for (std::size_t i = 0; i < count; ++i) {
        const ElfW(Sym)& sym = symbols[i];
        if ((sym.st_info & 0xf) != STT_FUNC || sym.st_name >= strtab.sh_size) continue;
        if (offset >= sym.st_value && offset < sym.st_value + (sym.st_size ? sym.st_size : 1)) {
          found = demangle(names + sym.st_name);
          break;
        }
      }
    }
  }
  munmap(map, size);
  return found;
}

}  // namespace

std::string LaunchState::kernel_name() const {
  Dl_info info{};
  if (config.kernel == nullptr || dladdr(config.kernel, &info) == 0) return "<unknown kernel>";
  if (info.dli_sname != nullptr) return demangle(info.dli_sname);
  if (info.dli_fname != nullptr && info.dli_fbase != nullptr) {
    const auto offset = reinterpret_cast<std::uintptr_t>(config.kernel) - reinterpret_cast<std::uintptr_t>(info.dli_fbase);
    std::string name = symtab_lookup(info.dli_fname, offset);
    if (!name.empty()) return name;
  }
  return "<unnamed kernel>";
}

}  // namespace detail
}  // namespace simt
}  // namespace fastbn
