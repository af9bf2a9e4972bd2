// The SIMT emulator behind cuda_emulation.h: runs a kernel launch on the CPU with CUDA's execution
// model and checks what a GPU would only show as a crash or a wrong answer.
//
// Execution. The blocks of a grid run one after another. The threads of a block are fibers on one OS
// thread (own stacks, a hand-written context switch): a thread runs until it reaches __syncthreads or
// a warp collective (shuffle, ldmatrix, mma), then the next thread runs. The last thread to reach a
// barrier releases it; the last lane of a warp collective computes the instruction for the warp.
//
// Checks, each reported as an error naming the kernel, block and thread:
// - launch limits of the modelled device (threads per block, grid size, dynamic shared memory with
//   and without cudaFuncSetAttribute, the device's opt-in maximum) and of the kernel (its
//   __launch_bounds__, which nvcc evaluates: see set_launch_bounds);
// - __syncthreads that part of the block never reaches (it exited or waits at something else), and
//   warp collectives whose mask leaves out the calling lane or names a lane that never arrives;
// - global memory: every tensor the ops see (inputs copied, outputs allocated) lies right before a
//   protected page, so a read or write past its end faults and is reported;
// - shared memory, for the accesses that go through the instruction models (ldmatrix reads,
//   cp.async writes): poisoned at block start (reading bytes nobody wrote fails), cp.async data
//   landing only at the wait_group that covers it (reading it earlier fails), and races: a granule
//   written or read by one thread and written or read by another with no barrier between.
// Plain loads and stores of shared memory are not seen; they read the poison pattern (0xff bytes,
// a NaN in every float type) where nothing was written.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <c10/core/CPUAllocator.h>

#include "cuda_emulation.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA emulator's context switch is written for x86-64 Linux"
#endif

// switch_context(save, load): saves the callee-saved registers on the current stack, stores the stack
// pointer in *save and resumes the context whose stack pointer is `load`. fiber_start is where a new
// fiber's first switch returns to: it calls r13(r12) and never returns.
extern "C" void mmv_emulation_switch_context(void** save, void* load);
extern "C" void mmv_emulation_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl mmv_emulation_switch_context
  .hidden mmv_emulation_switch_context
  .type mmv_emulation_switch_context, @function
mmv_emulation_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mmv_emulation_switch_context, .-mmv_emulation_switch_context

  .p2align 4
  .globl mmv_emulation_fiber_start
  .hidden mmv_emulation_fiber_start
  .type mmv_emulation_fiber_start, @function
mmv_emulation_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size mmv_emulation_fiber_start, .-mmv_emulation_fiber_start
)");

namespace mmv {
namespace emulation {

ThreadCoordinates* current_thread = nullptr;
uint3 block_index{0, 0, 0};
dim3 block_dim;
dim3 grid_dim;

namespace {

// ---------------------------------------------------------------------------------------------------
// Modelled devices.

struct DeviceModel {
  const char* name;
  int multiprocessors;
  int compute_major;
  int compute_minor;
  int shared_per_block_optin;
  int shared_per_multiprocessor;
  int threads_per_multiprocessor;
  int blocks_per_multiprocessor;
};

constexpr DeviceModel kDevices[] = {
    {"H100", 132, 9, 0, 227 * 1024, 228 * 1024, 2048, 32},
    {"A100", 108, 8, 0, 163 * 1024, 164 * 1024, 2048, 32},
};
constexpr int kDefaultSharedBytes = 48 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kReservedSharedPerBlock = 1024;  // what the hardware keeps per resident block

constexpr int kDeviceCount = 2;
int current = 0;  // the current device
const DeviceModel& model() { return kDevices[current]; }
std::map<std::pair<int, const void*>, int> max_dynamic_shared;  // cudaFuncSetAttribute's, per device
cudaError_t last_error = cudaSuccess;
std::string last_error_message;

cudaError_t set_error(cudaError_t error, std::string message) {
  last_error = error;
  last_error_message = std::move(message);
  return error;
}

// ---------------------------------------------------------------------------------------------------
// __launch_bounds__. The emulated build compiles them away (GCC keeps no such number with a function),
// so nvcc evaluates them: tests/emulated_cuda.py reads the .maxntid of every .entry in the PTX of the
// kernel sources and hands the table to set_launch_bounds. A launch finds its kernel's row by name: the
// kernel's symbol (mangled as nvcc mangles the .entry), both demangled, which also makes the anonymous
// namespaces the kernels live in, spelled differently by the two compilers, compare equal.

std::mutex bounds_mutex;                  // guards the three below
bool launch_bounds_known = false;         // set_launch_bounds was called
std::map<std::string, int> launch_bounds;  // demangled kernel -> most threads per block
struct Kernel {
  std::string name;  // demangled, with template arguments and parameter types
  int max_threads;   // its __launch_bounds__ (the product of .maxntid), 0 when it declares none
};
std::map<const void*, Kernel> kernels;  // those looked up so far, by address

std::string demangle(const char* mangled) {
  int status = 0;
  const std::unique_ptr<char, decltype(&std::free)> name(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                                          &std::free);
  return status == 0 ? std::string(name.get()) : std::string(mangled);
}

// The mangled name of the function at `address`, read from the symbol table (.symtab) of the shared
// object that holds it: kernels in anonymous namespaces have local symbols, which dladdr does not see.
// Empty when no symbol is there (a stripped object).
std::string symbol_at(const void* address) {
  Dl_info info{};
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return {};
  const int fd = open(info.dli_fname, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  struct stat status{};
  const bool sized = fstat(fd, &status) == 0 && static_cast<size_t>(status.st_size) >= sizeof(Elf64_Ehdr);
  void* mapping = sized ? mmap(nullptr, status.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  close(fd);
  if (mapping == MAP_FAILED) return {};
  const size_t size = status.st_size;
  const auto* file = static_cast<const unsigned char*>(mapping);
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(file);
  const uintptr_t offset = reinterpret_cast<uintptr_t>(address) - reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::string name;
  if (std::memcmp(header->e_ident, ELFMAG, SELFMAG) == 0 && header->e_ident[EI_CLASS] == ELFCLASS64 &&
      header->e_shoff + uint64_t{header->e_shnum} * sizeof(Elf64_Shdr) <= size) {
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(file + header->e_shoff);
    for (int s = 0; s < header->e_shnum && name.empty(); ++s) {
      const Elf64_Shdr& table = sections[s];
      if (table.sh_type != SHT_SYMTAB || table.sh_link >= header->e_shnum ||
          table.sh_offset + table.sh_size > size) {
        continue;
      }
      const Elf64_Shdr& strings = sections[table.sh_link];
      const auto* symbols = reinterpret_cast<const Elf64_Sym*>(file + table.sh_offset);
      for (size_t i = 0; i < table.sh_size / sizeof(Elf64_Sym); ++i) {
        const Elf64_Sym& symbol = symbols[i];
        if (ELF64_ST_TYPE(symbol.st_info) == STT_FUNC && symbol.st_value == offset &&
            symbol.st_name < strings.sh_size && strings.sh_offset + strings.sh_size <= size) {
          const char* begin = reinterpret_cast<const char*>(file + strings.sh_offset + symbol.st_name);
          name.assign(begin, strnlen(begin, strings.sh_size - symbol.st_name));
          break;
        }
      }
    }
  }
  munmap(mapping, size);
  return name;
}

// The kernel at `address`, named and with its bound, once set_launch_bounds has been called; nullopt
// before.
std::optional<Kernel> kernel_at(const void* address) {
  const std::lock_guard<std::mutex> lock(bounds_mutex);
  if (!launch_bounds_known) return std::nullopt;
  const auto found = kernels.find(address);
  if (found != kernels.end()) return found->second;
  const std::string symbol = symbol_at(address);
  TORCH_CHECK(!symbol.empty(), "CUDA emulator: no symbol of mmv_emulated names the kernel at ", address,
              ", so its __launch_bounds__ cannot be checked (is the library stripped?)");
  Kernel kernel{demangle(symbol.c_str()), 0};
  const auto bound = launch_bounds.find(kernel.name);
  if (bound != launch_bounds.end()) kernel.max_threads = bound->second;
  return kernels.emplace(address, std::move(kernel)).first->second;
}

// ---------------------------------------------------------------------------------------------------
// Guarded allocations: the bytes of an allocation end at a protected page (up to 15 bytes of padding
// keep 16-byte alignment), so that an access past the end faults.

constexpr size_t kPage = 4096;

struct Mapping {
  unsigned char* base;  // the mapping, guard pages included
  size_t bytes;
  size_t user_bytes;
};
std::mutex allocations_mutex;
std::map<uintptr_t, Mapping> allocations;  // by the user pointer

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

void* guarded_allocate(size_t n) {
  const size_t data_bytes = round_up(std::max<size_t>(round_up(n, 16), 1), kPage);
  const size_t bytes = data_bytes + 2 * kPage;
  void* mapping = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(mapping != MAP_FAILED, "CUDA emulator: cannot map ", bytes, " bytes");
  auto* base = static_cast<unsigned char*>(mapping);
  TORCH_CHECK(mprotect(base + kPage, data_bytes, PROT_READ | PROT_WRITE) == 0, "CUDA emulator: mprotect failed");
  unsigned char* user = base + kPage + data_bytes - round_up(n, 16);
  const std::lock_guard<std::mutex> lock(allocations_mutex);
  allocations[reinterpret_cast<uintptr_t>(user)] = {base, bytes, n};
  return user;
}

void guarded_free(void* p) {
  if (p == nullptr) return;
  Mapping mapping{};
  {
    const std::lock_guard<std::mutex> lock(allocations_mutex);
    const auto found = allocations.find(reinterpret_cast<uintptr_t>(p));
    if (found == allocations.end()) return;
    mapping = found->second;
    allocations.erase(found);
  }
  munmap(mapping.base, mapping.bytes);
}

// Where an address lies relative to the guarded allocations, for a fault report.
std::string describe_address(uintptr_t address) {
  std::ostringstream out;
  out << "address 0x" << std::hex << address << std::dec;
  auto found = allocations.upper_bound(address);
  if (found != allocations.begin()) {
    --found;
    const uintptr_t begin = found->first;
    const uintptr_t end = begin + found->second.user_bytes;
    const uintptr_t mapping_end = reinterpret_cast<uintptr_t>(found->second.base) + found->second.bytes;
    if (address >= end && address < mapping_end) {
      out << ", " << address - end << " bytes past the end of an allocation of " << found->second.user_bytes
          << " bytes";
      return out.str();
    }
  }
  out << ", outside every allocation the launch can see";
  return out.str();
}

struct GuardedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = guarded_allocate(n);
    return {p, p, &guarded_free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &guarded_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};
GuardedAllocator guarded_allocator;

// ---------------------------------------------------------------------------------------------------
// Threads, blocks and the launch in progress.

enum class State : uint8_t { kReady, kBarrier, kWarp, kExited };
enum class WarpOp : uint8_t { kShuffleXor, kShuffleUp, kLdmatrix, kLdmatrixTrans, kMmaBFloat16, kMmaFloat16 };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShuffleXor:
      return "__shfl_xor_sync";
    case WarpOp::kShuffleUp:
      return "__shfl_up_sync";
    case WarpOp::kLdmatrix:
      return "ldmatrix.x4";
    case WarpOp::kLdmatrixTrans:
      return "ldmatrix.x4.trans";
    case WarpOp::kMmaBFloat16:
      return "mma.m16n8k16.bf16";
    case WarpOp::kMmaFloat16:
      return "mma.m16n8k16.f16";
  }
  return "?";
}

struct PendingCopy {
  unsigned char* destination;
  unsigned char data[16];
  int bytes;
};

struct Thread {
  ThreadCoordinates coordinates;
  int id = 0;  // linear index in the block
  State state = State::kReady;
  void* stack_pointer = nullptr;
  unsigned char* stack = nullptr;
  // The warp collective this thread waits at: its operands in, its result out.
  WarpOp op = WarpOp::kShuffleXor;
  unsigned mask = 0;
  int argument = 0;
  alignas(16) unsigned char in[48];
  alignas(16) unsigned char out[16];
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> committed;
};

// Shadow state of one 4-byte granule of dynamic shared memory.
enum class Granule : uint8_t { kUnwritten, kPending, kWritten };
constexpr uint16_t kNobody = 0xffff;
constexpr uint16_t kSeveral = 0xfffe;
struct Shadow {
  Granule state;
  uint16_t writer;
  uint16_t reader;
  uint32_t write_epoch;
  uint32_t read_epoch;
};

constexpr size_t kStackBytes = 64 * 1024;

struct Launch {
  LaunchConfig config;
  void (*body)(const void*);
  const void* closure;
  std::string caller;
  std::vector<Thread> threads;
  int live = 0;
  int exited = 0;
  int at_barrier = 0;
  uint32_t epoch = 0;  // barriers passed by the block
  std::vector<Shadow> shadow;
  // Per warp: lanes waiting at a collective, and lanes that have exited.
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_exited;
  void* scheduler_stack_pointer = nullptr;
  std::string error;
};

Launch* launch_in_progress = nullptr;
Thread* running = nullptr;
std::vector<unsigned char*> stacks;  // reused from launch to launch
std::mutex launch_mutex;             // one launch at a time: the fibers share globals

std::string coordinates(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

std::string where(const Thread& t) {
  return "block " + coordinates(block_index) + " thread " + coordinates(t.coordinates.thread_index);
}

// A round of the scheduler runs each thread that can run, in index order, until it waits or exits. A
// thread that stops switches straight to the next one of the round (one context switch per wait, not
// two through the scheduler), and to the scheduler when the round is over.
void pass_on(void** save, Launch& l, size_t from) {
  for (size_t i = from; i < l.threads.size(); ++i) {
    Thread& next = l.threads[i];
    if (next.state != State::kReady) continue;
    running = &next;
    current_thread = &next.coordinates;
    mmv_emulation_switch_context(save, next.stack_pointer);
    return;
  }
  mmv_emulation_switch_context(save, l.scheduler_stack_pointer);
}

void yield(Thread& t) { pass_on(&t.stack_pointer, *launch_in_progress, t.id + 1); }

// Ends the launch with an error reported by `t`'s context; the block's fibers are abandoned.
[[noreturn]] void fail(const Thread& t, const std::string& what) {
  Launch& l = *launch_in_progress;
  if (l.error.empty()) l.error = where(t) + ": " + what;
  void* abandoned = nullptr;
  mmv_emulation_switch_context(&abandoned, l.scheduler_stack_pointer);
  __builtin_unreachable();
}

Thread& me() { return *running; }

// ---------------------------------------------------------------------------------------------------
// Shared memory checks.

Shadow* shadow_of(const Thread& t, const void* p, size_t bytes, size_t alignment, const char* what) {
  Launch& l = *launch_in_progress;
  const auto* address = static_cast<const unsigned char*>(p);
  const unsigned char* base = l.config.dynamic_shared;
  if (address < base || address + bytes > base + l.config.dynamic_shared_bytes) {
    std::ostringstream out;
    out << what << " at offset " << (address - base) << " (" << bytes << " bytes) outside the "
        << l.config.dynamic_shared_bytes << " bytes of dynamic shared memory of the launch";
    fail(t, out.str());
  }
  if (reinterpret_cast<uintptr_t>(address) % alignment != 0) {
    fail(t, std::string(what) + " at offset " + std::to_string(address - base) + " is not " +
                std::to_string(alignment) + "-byte aligned");
  }
  return &l.shadow[(address - base) / 4];
}

std::string who(uint16_t id) { return id == kSeveral ? "several threads" : "thread " + std::to_string(id); }

// A read of `bytes` bytes at p by thread `reader` (the lane that supplied the address).
void check_shared_read(const Thread& reader, const unsigned char* p, size_t bytes, const char* what) {
  Launch& l = *launch_in_progress;
  Shadow* shadow = shadow_of(reader, p, bytes, 16, what);
  const uint16_t id = static_cast<uint16_t>(reader.id);
  for (size_t g = 0; g < bytes / 4; ++g) {
    Shadow& s = shadow[g];
    const size_t offset = p + 4 * g - l.config.dynamic_shared;
    if (s.state == Granule::kPending) {
      fail(reader, std::string(what) + " reads shared memory at offset " + std::to_string(offset) +
                       " that a cp.async of thread " + std::to_string(s.writer) +
                       " has not landed yet: no cp.async.wait_group covers it");
    }
    if (s.state == Granule::kUnwritten) {
      // Plain stores are not seen: bytes that no longer hold the poison pattern were written.
      uint16_t halves[2];
      std::memcpy(halves, p + 4 * g, 4);
      if (halves[0] == 0xffff || halves[1] == 0xffff) {
        fail(reader, std::string(what) + " reads shared memory at offset " + std::to_string(offset) +
                         " that no thread of the block has written");
      }
    } else if (s.write_epoch == l.epoch && s.writer != id) {
      fail(reader, std::string("race: ") + what + " reads shared memory at offset " + std::to_string(offset) +
                       " that thread " + std::to_string(s.writer) + " wrote with no __syncthreads between");
    }
    if (s.read_epoch != l.epoch) {
      s.read_epoch = l.epoch;
      s.reader = id;
    } else if (s.reader != id) {
      s.reader = kSeveral;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Barriers and warp collectives.

[[noreturn]] void thread_exit(Thread& t);

void release_barrier(Launch& l) {
  ++l.epoch;
  l.at_barrier = 0;
  for (Thread& t : l.threads) {
    if (t.state == State::kBarrier) t.state = State::kReady;
  }
}

void resolve_warp(Launch& l, int warp, unsigned mask);

std::string hex(unsigned v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

// Whether every lane of t's mask waits at t's collective (the warp's arrival count says when to
// look); fails on a lane that never will.
bool warp_complete(Launch& l, const Thread& t) {
  const int warp = t.id / 32;
  const unsigned gone = t.mask & l.warp_exited[warp];
  if (gone != 0) {
    fail(t, std::string(op_name(t.op)) + ": lane " + std::to_string(__builtin_ctz(gone)) +
                " of its mask has exited and never reaches it");
  }
  if (l.warp_arrived[warp] < __builtin_popcount(t.mask)) return false;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(t.mask >> lane & 1u)) continue;
    const int id = warp * 32 + lane;
    if (id >= static_cast<int>(l.threads.size())) {
      fail(t, std::string(op_name(t.op)) + " with mask " + hex(t.mask) + " names lane " + std::to_string(lane) +
                  ", which the block does not have");
    }
    const Thread& other = l.threads[id];
    if (other.state != State::kWarp) return false;  // the count includes lanes of another mask
    if (other.op != t.op || other.mask != t.mask) {
      fail(t, std::string(op_name(t.op)) + " with mask " + hex(t.mask) + ": lane " + std::to_string(lane) +
                  " waits at " + op_name(other.op) + " with mask " + hex(other.mask) + " instead");
    }
  }
  return true;
}

// Runs t's warp collective once all lanes of its mask have arrived; returns with t.out filled.
void warp_collective(Thread& t, WarpOp op, unsigned mask, int argument, const void* in, size_t in_bytes) {
  Launch& l = *launch_in_progress;
  const int lane = t.id % 32;
  if (!(mask >> lane & 1u)) {
    fail(t, std::string(op_name(op)) + " with mask " + hex(mask) + " leaves out the calling lane " +
                std::to_string(lane));
  }
  t.op = op;
  t.mask = mask;
  t.argument = argument;
  std::memcpy(t.in, in, in_bytes);
  t.state = State::kWarp;
  ++l.warp_arrived[t.id / 32];
  if (warp_complete(l, t)) {
    resolve_warp(l, t.id / 32, mask);
    t.state = State::kReady;
    return;
  }
  yield(t);
}

uint16_t b16(const unsigned char* row, int column) {
  uint16_t v;
  std::memcpy(&v, row + 2 * column, 2);
  return v;
}

float element_to_float(uint16_t bits, WarpOp op) {
  return op == WarpOp::kMmaBFloat16 ? c10::detail::f32_from_bits(bits) : c10::detail::fp16_ieee_to_fp32_value(bits);
}

void resolve_warp(Launch& l, int warp, unsigned mask) {
  Thread* lanes = &l.threads[warp * 32];
  const Thread& first = lanes[__builtin_ctz(mask)];
  const WarpOp op = first.op;
  switch (op) {
    case WarpOp::kShuffleXor:
    case WarpOp::kShuffleUp: {
      for (int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        Thread& t = lanes[lane];
        const int source = op == WarpOp::kShuffleXor ? lane ^ t.argument : lane - t.argument;
        // Out of the warp's range, the lane keeps its own value; a lane outside the mask is undefined.
        const int from = source < 0 || source > 31 ? lane : source;
        if (!(mask >> from & 1u)) {
          fail(t, std::string(op_name(op)) + " reads lane " + std::to_string(from) + ", which is not in its mask");
        }
        std::memcpy(t.out, lanes[from].in, 8);
      }
      break;
    }
    case WarpOp::kLdmatrix:
    case WarpOp::kLdmatrixTrans: {
      // Lanes 8i..8i+7 give the row addresses of matrix i (8 x 8 b16). Lane l receives, in register
      // i, the pair (row l/4, columns 2(l%4), 2(l%4)+1) of matrix i, or with .trans of its transpose.
      const unsigned char* rows[32];
      for (int lane = 0; lane < 32; ++lane) {
        std::memcpy(&rows[lane], lanes[lane].in, sizeof(rows[lane]));
        check_shared_read(lanes[lane], rows[lane], 16, op_name(op));
      }
      for (int lane = 0; lane < 32; ++lane) {
        uint32_t r[4];
        for (int i = 0; i < 4; ++i) {
          uint16_t lo, hi;
          if (op == WarpOp::kLdmatrix) {
            const unsigned char* row = rows[8 * i + lane / 4];
            lo = b16(row, 2 * (lane % 4));
            hi = b16(row, 2 * (lane % 4) + 1);
          } else {
            lo = b16(rows[8 * i + 2 * (lane % 4)], lane / 4);
            hi = b16(rows[8 * i + 2 * (lane % 4) + 1], lane / 4);
          }
          r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
        }
        std::memcpy(lanes[lane].out, r, sizeof(r));
      }
      break;
    }
    case WarpOp::kMmaBFloat16:
    case WarpOp::kMmaFloat16: {
      // Fragment layouts of mma.m16n8k16 (PTX ISA), g = lane / 4, c = lane % 4:
      //   A: reg0 (g, 2c..2c+1), reg1 (g+8, 2c..), reg2 (g, 2c+8..), reg3 (g+8, 2c+8..)
      //   B: reg0 (k 2c..2c+1, n g), reg1 (k 2c+8.., n g)
      //   C, D: c0 c1 (g, 2c..2c+1), c2 c3 (g+8, 2c..2c+1)
      float a[16][16], b[16][8], c[16][8];
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, q = lane % 4;
        float accumulators[4];
        uint32_t regs[6];
        std::memcpy(accumulators, lanes[lane].in, 16);
        std::memcpy(regs, lanes[lane].in + 16, 24);
        const int a_rows[4] = {g, g + 8, g, g + 8};
        const int a_cols[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
        for (int i = 0; i < 4; ++i) {
          a[a_rows[i]][a_cols[i]] = element_to_float(static_cast<uint16_t>(regs[i]), op);
          a[a_rows[i]][a_cols[i] + 1] = element_to_float(static_cast<uint16_t>(regs[i] >> 16), op);
        }
        for (int i = 0; i < 2; ++i) {
          b[2 * q + 8 * i][g] = element_to_float(static_cast<uint16_t>(regs[4 + i]), op);
          b[2 * q + 8 * i + 1][g] = element_to_float(static_cast<uint16_t>(regs[4 + i] >> 16), op);
        }
        c[g][2 * q] = accumulators[0];
        c[g][2 * q + 1] = accumulators[1];
        c[g + 8][2 * q] = accumulators[2];
        c[g + 8][2 * q + 1] = accumulators[3];
      }
      // Products of 8- or 11-bit significands are exact in float; the sum is rounded once.
      float d[16][8];
      for (int m = 0; m < 16; ++m) {
        for (int n = 0; n < 8; ++n) {
          double sum = c[m][n];
          for (int k = 0; k < 16; ++k) sum += static_cast<double>(a[m][k] * b[k][n]);
          d[m][n] = static_cast<float>(sum);
        }
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, q = lane % 4;
        const float out[4] = {d[g][2 * q], d[g][2 * q + 1], d[g + 8][2 * q], d[g + 8][2 * q + 1]};
        std::memcpy(lanes[lane].out, out, sizeof(out));
      }
      break;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1u) lanes[lane].state = State::kReady;
  }
  l.warp_arrived[warp] -= __builtin_popcount(mask);
}

// ---------------------------------------------------------------------------------------------------
// cp.async.

void land(Thread& t, const std::vector<PendingCopy>& group) {
  Launch& l = *launch_in_progress;
  for (const PendingCopy& copy : group) {
    std::memcpy(copy.destination, copy.data, copy.bytes);
    Shadow* shadow = &l.shadow[(copy.destination - l.config.dynamic_shared) / 4];
    for (int g = 0; g < copy.bytes / 4; ++g) {
      shadow[g].state = Granule::kWritten;
      shadow[g].writer = static_cast<uint16_t>(t.id);
      shadow[g].write_epoch = l.epoch;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The fibers.

void fiber_main(void* argument) {
  Thread& t = *static_cast<Thread*>(argument);
  Launch& l = *launch_in_progress;
  try {
    l.body(l.closure);
  } catch (const std::exception& e) {
    fail(t, std::string("the kernel threw: ") + e.what());
  }
  thread_exit(t);
}

[[noreturn]] void thread_exit(Thread& t) {
  Launch& l = *launch_in_progress;
  for (auto& group : t.committed) land(t, group);
  t.committed.clear();
  land(t, t.uncommitted);
  t.uncommitted.clear();
  t.state = State::kExited;
  --l.live;
  ++l.exited;
  l.warp_exited[t.id / 32] |= 1u << (t.id % 32);
  if (l.at_barrier > 0 && l.at_barrier + l.exited == static_cast<int>(l.threads.size())) {
    fail(t, "divergent __syncthreads: " + std::to_string(l.at_barrier) +
                " threads wait at a barrier that this thread exited without reaching");
  }
  const int warp0 = t.id / 32 * 32;
  for (int lane = 0; lane < 32 && warp0 + lane < static_cast<int>(l.threads.size()); ++lane) {
    const Thread& other = l.threads[warp0 + lane];
    if (other.state == State::kWarp && (other.mask >> (t.id % 32) & 1u)) {
      fail(t, "this lane exited, but lane " + std::to_string(lane) + " waits for it at " + op_name(other.op));
    }
  }
  void* abandoned = nullptr;
  pass_on(&abandoned, l, t.id + 1);
  __builtin_unreachable();
}

unsigned char* stack_of(size_t index) {
  while (stacks.size() <= index) {
    void* mapping =
        mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mapping != MAP_FAILED, "CUDA emulator: cannot map a thread stack");
    mprotect(mapping, kPage, PROT_NONE);  // overflow faults
    stacks.push_back(static_cast<unsigned char*>(mapping) + kPage);
  }
  return stacks[index];
}

void start_fiber(Thread& t) {
  auto top = reinterpret_cast<uintptr_t>(t.stack + kStackBytes) & ~uintptr_t{15};
  auto** frame = reinterpret_cast<void**>(top - 16 - 56);
  frame[0] = nullptr;                                            // r15
  frame[1] = nullptr;                                            // r14
  frame[2] = reinterpret_cast<void*>(&fiber_main);               // r13: the function
  frame[3] = &t;                                                 // r12: its argument
  frame[4] = nullptr;                                            // rbx
  frame[5] = nullptr;                                            // rbp
  frame[6] = reinterpret_cast<void*>(&mmv_emulation_fiber_start);  // return address
  t.stack_pointer = frame;
}

// Faults inside a kernel (an access past a guarded allocation, a stack overflow) end the launch
// with a report; others go to the handler that was there before.
struct sigaction previous_segv;
struct sigaction previous_bus;
std::vector<unsigned char> signal_stack(64 * 1024);

void on_fault(int signal, siginfo_t* info, void*) {
  if (running == nullptr || launch_in_progress == nullptr) {
    sigaction(signal, signal == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
    return;  // the faulting instruction runs again, under the previous handler
  }
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  const auto stack = reinterpret_cast<uintptr_t>(running->stack);
  if (address < stack && address + kPage >= stack) fail(*running, "stack overflow of the emulated thread");
  fail(*running, "invalid global memory access: " + describe_address(address));
}

std::string kernel_description(const Launch& l) {
  std::string name = l.config.name;
  // The launching function's template arguments say which instantiation ran.
  const size_t with = l.caller.find("[with ");
  if (with != std::string::npos) name += " " + l.caller.substr(with);
  return name + " launched at " + l.config.file + ":" + std::to_string(l.config.line);
}

// Why the modelled device refuses a launch, and with which error; an empty `what` when it does not.
struct LaunchProblem {
  cudaError_t error = cudaSuccess;
  std::string what;
};

LaunchProblem launch_check(const LaunchConfig& c) {
  std::ostringstream out;
  cudaError_t error = cudaErrorInvalidConfiguration;
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || c.block.z > 64) {
    out << threads << " threads per block (" << c.block.x << " x " << c.block.y << " x " << c.block.z
        << "): a block has 1 to " << kMaxThreadsPerBlock << " threads, at most 64 in z";
  } else if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 0x7fffffffu || c.grid.y > 65535 ||
             c.grid.z > 65535) {
    out << "grid " << c.grid.x << " x " << c.grid.y << " x " << c.grid.z
        << ": x from 1 to 2^31 - 1, y and z from 1 to 65535";
  } else if (c.dynamic_shared_bytes > static_cast<size_t>(model().shared_per_block_optin)) {
    out << c.dynamic_shared_bytes << " bytes of dynamic shared memory: more than the "
        << model().shared_per_block_optin << " a block may opt in to on the " << model().name;
  } else {
    const auto found = max_dynamic_shared.find({current, c.kernel});
    const int allowed = found == max_dynamic_shared.end() ? kDefaultSharedBytes : found->second;
    if (c.dynamic_shared_bytes > static_cast<size_t>(allowed)) {
      out << c.dynamic_shared_bytes << " bytes of dynamic shared memory: more than the " << allowed
          << " allowed; above 48 KB, cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) must "
             "raise the kernel's limit first";
    } else if (const auto kernel = kernel_at(c.kernel);
               kernel && kernel->max_threads > 0 && threads > static_cast<uint64_t>(kernel->max_threads)) {
      error = cudaErrorLaunchOutOfResources;
      out << threads << " threads per block (" << c.block.x << " x " << c.block.y << " x " << c.block.z
          << "): more than the " << kernel->max_threads << " of the kernel's __launch_bounds__ (" << kernel->name
          << "); a GPU refuses it: too many resources requested for launch";
    }
  }
  const std::string what = out.str();
  return {what.empty() ? cudaSuccess : error, what};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// What the kernels call.

void syncthreads() {
  Thread& t = me();
  Launch& l = *launch_in_progress;
  t.state = State::kBarrier;
  ++l.at_barrier;
  const int size = static_cast<int>(l.threads.size());
  if (l.at_barrier == size) {
    release_barrier(l);
    return;
  }
  if (l.exited > 0 && l.at_barrier + l.exited == size) {
    fail(t, "divergent __syncthreads: " + std::to_string(l.exited) +
                " threads of the block exited without reaching this barrier");
  }
  yield(t);
}

void shuffle(Shuffle kind, unsigned mask, void* value, int bytes, int argument) {
  Thread& t = me();
  unsigned char in[8] = {};
  std::memcpy(in, value, bytes);
  warp_collective(t, kind == Shuffle::kXor ? WarpOp::kShuffleXor : WarpOp::kShuffleUp, mask, argument, in, 8);
  std::memcpy(value, t.out, bytes);
}

void mma_m16n8k16(MmaInput input, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Thread& t = me();
  unsigned char in[40];
  std::memcpy(in, c, 16);
  std::memcpy(in + 16, a, 16);
  std::memcpy(in + 32, &b0, 4);
  std::memcpy(in + 36, &b1, 4);
  warp_collective(t, input == MmaInput::kBFloat16 ? WarpOp::kMmaBFloat16 : WarpOp::kMmaFloat16, 0xffffffffu, 0, in,
                  sizeof(in));
  std::memcpy(c, t.out, 16);
}

void ldmatrix_x4(uint32_t (&r)[4], const void* shared, bool transpose) {
  Thread& t = me();
  warp_collective(t, transpose ? WarpOp::kLdmatrixTrans : WarpOp::kLdmatrix, 0xffffffffu, 0, &shared,
                  sizeof(shared));
  std::memcpy(r, t.out, 16);
}

void cp_async(void* shared, const void* global, int copy_bytes, int source_bytes) {
  Thread& t = me();
  Launch& l = *launch_in_progress;
  Shadow* shadow = shadow_of(t, shared, copy_bytes, copy_bytes, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(global) % copy_bytes != 0) {
    fail(t, "cp.async source " + describe_address(reinterpret_cast<uintptr_t>(global)) + " is not " +
                std::to_string(copy_bytes) + "-byte aligned");
  }
  const uint16_t id = static_cast<uint16_t>(t.id);
  const size_t offset = static_cast<unsigned char*>(shared) - l.config.dynamic_shared;
  for (int g = 0; g < copy_bytes / 4; ++g) {
    const Shadow& s = shadow[g];
    if (s.state != Granule::kUnwritten && s.write_epoch == l.epoch && s.writer != id) {
      fail(t, "race: cp.async writes shared memory at offset " + std::to_string(offset + 4 * g) + " that thread " +
                  std::to_string(s.writer) + " also writes with no __syncthreads between");
    }
    if (s.read_epoch == l.epoch && s.reader != id && s.reader != kNobody) {
      fail(t, "race: cp.async overwrites shared memory at offset " + std::to_string(offset + 4 * g) + " that " +
                  who(s.reader) + " read with no __syncthreads between");
    }
  }
  PendingCopy copy{static_cast<unsigned char*>(shared), {}, copy_bytes};
  std::memcpy(copy.data, global, source_bytes);  // an access past an allocation faults here
  std::memset(static_cast<unsigned char*>(shared), 0xff, copy_bytes);
  for (int g = 0; g < copy_bytes / 4; ++g) {
    shadow[g].state = Granule::kPending;
    shadow[g].writer = id;
    shadow[g].write_epoch = l.epoch;
  }
  t.uncommitted.push_back(copy);
}

void cp_async_commit_group() {
  Thread& t = me();
  t.committed.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void cp_async_wait_group(int pending) {
  Thread& t = me();
  while (static_cast<int>(t.committed.size()) > pending) {
    land(t, t.committed.front());
    t.committed.pop_front();
  }
}

void run_kernel(const LaunchConfig& config, void (*thread_body)(const void*), const void* closure) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  Launch l;
  l.config = config;
  l.body = thread_body;
  l.closure = closure;
  l.caller = config.caller;
  const LaunchProblem problem = launch_check(config);
  if (problem.error != cudaSuccess) {
    set_error(problem.error, "CUDA emulator: invalid launch of " + std::string(config.name) + " at " + config.file +
                                 ":" + std::to_string(config.line) + ": " + problem.what);
    return;
  }
  const int threads = static_cast<int>(config.block.x * config.block.y * config.block.z);
  l.threads.resize(threads);
  for (int i = 0; i < threads; ++i) {
    Thread& t = l.threads[i];
    t.id = i;
    t.stack = stack_of(i);
    t.coordinates.thread_index = {i % config.block.x, i / config.block.x % config.block.y,
                                  i / (config.block.x * config.block.y)};
  }
  l.shadow.resize(round_up(config.dynamic_shared_bytes, 4) / 4);
  l.warp_arrived.resize((threads + 31) / 32);
  l.warp_exited.resize((threads + 31) / 32);
  block_dim = config.block;
  grid_dim = config.grid;

  stack_t alternate{};
  alternate.ss_sp = signal_stack.data();
  alternate.ss_size = signal_stack.size();
  stack_t previous_alternate{};
  sigaltstack(&alternate, &previous_alternate);
  struct sigaction action{};
  action.sa_sigaction = &on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &previous_segv);
  sigaction(SIGBUS, &action, &previous_bus);
  launch_in_progress = &l;

  for (unsigned z = 0; z < config.grid.z && l.error.empty(); ++z) {
    for (unsigned y = 0; y < config.grid.y && l.error.empty(); ++y) {
      for (unsigned x = 0; x < config.grid.x && l.error.empty(); ++x) {
        block_index = {x, y, z};
        // Shared memory starts poisoned: 0xff bytes, a NaN in every float type.
        std::memset(config.dynamic_shared, 0xff, config.dynamic_shared_bytes);
        std::fill(l.shadow.begin(), l.shadow.end(),
                  Shadow{Granule::kUnwritten, kNobody, kNobody, 0xffffffffu, 0xffffffffu});
        l.epoch = 0;
        std::fill(l.warp_arrived.begin(), l.warp_arrived.end(), 0);
        std::fill(l.warp_exited.begin(), l.warp_exited.end(), 0u);
        l.live = threads;
        l.exited = 0;
        l.at_barrier = 0;
        for (Thread& t : l.threads) {
          t.state = State::kReady;
          t.uncommitted.clear();
          t.committed.clear();
          start_fiber(t);
        }
        while (l.live > 0 && l.error.empty()) {
          const auto first = std::find_if(l.threads.begin(), l.threads.end(),
                                          [](const Thread& t) { return t.state == State::kReady; });
          if (first != l.threads.end()) {
            // A round: back here when it is over or a thread failed.
            pass_on(&l.scheduler_stack_pointer, l, first - l.threads.begin());
            running = nullptr;
          } else {
            // Nobody can run: threads wait at collectives that the others never reach.
            for (Thread& t : l.threads) {
              if (t.state == State::kWarp) {
                l.error = where(t) + ": " + op_name(t.op) + " waits for lanes that wait at __syncthreads";
                break;
              }
            }
            if (l.error.empty()) l.error = "deadlock: no thread of the block can run";
          }
        }
      }
    }
  }

  launch_in_progress = nullptr;
  current_thread = nullptr;
  sigaction(SIGSEGV, &previous_segv, nullptr);
  sigaction(SIGBUS, &previous_bus, nullptr);
  sigaltstack(&previous_alternate, nullptr);
  if (!l.error.empty()) {
    TORCH_CHECK(false, "CUDA emulator: ", kernel_description(l), ": ", l.error);
  }
}

}  // namespace emulation
}  // namespace mmv

// ---------------------------------------------------------------------------------------------------
// Runtime API of the modelled device.

using mmv::emulation::last_error;
using mmv::emulation::model;

c10::DeviceIndex c10::cuda::current_device() { return static_cast<c10::DeviceIndex>(mmv::emulation::current); }

cudaError_t cudaGetLastError() {
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : mmv::emulation::last_error_message.c_str();
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device < 0 || device >= mmv::emulation::kDeviceCount) {
    return mmv::emulation::set_error(cudaErrorInvalidValue, "CUDA emulator: no device " + std::to_string(device));
  }
  const auto& asked = mmv::emulation::kDevices[device];
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = mmv::emulation::kMaxThreadsPerBlock;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = asked.multiprocessors;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = asked.compute_major;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = asked.compute_minor;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = asked.shared_per_block_optin;
      return cudaSuccess;
  }
  return mmv::emulation::set_error(cudaErrorInvalidValue, "CUDA emulator: unknown device attribute " +
                                                              std::to_string(static_cast<int>(attribute)));
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel) {
  *attributes = cudaFuncAttributes{};
  const auto bounded = mmv::emulation::kernel_at(kernel);
  attributes->maxThreadsPerBlock = bounded && bounded->max_threads > 0
                                       ? std::min(bounded->max_threads, mmv::emulation::kMaxThreadsPerBlock)
                                       : mmv::emulation::kMaxThreadsPerBlock;
  attributes->binaryVersion = model().compute_major * 10 + model().compute_minor;
  attributes->ptxVersion = attributes->binaryVersion;
  const auto found = mmv::emulation::max_dynamic_shared.find({mmv::emulation::current, kernel});
  attributes->maxDynamicSharedSizeBytes =
      found == mmv::emulation::max_dynamic_shared.end() ? mmv::emulation::kDefaultSharedBytes : found->second;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > model().shared_per_block_optin) {
    return mmv::emulation::set_error(cudaErrorInvalidValue,
                                     "CUDA emulator: cudaFuncSetAttribute(" + std::to_string(value) +
                                         ") beyond the " + std::to_string(model().shared_per_block_optin) +
                                         " bytes of opt-in shared memory of the " + model().name);
  }
  mmv::emulation::max_dynamic_shared[{mmv::emulation::current, kernel}] = value;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size,
                                                          size_t dynamic_shared_bytes) {
  if (block_size <= 0 || block_size > mmv::emulation::kMaxThreadsPerBlock) {
    return mmv::emulation::set_error(cudaErrorInvalidValue, "CUDA emulator: occupancy of a block of " +
                                                                std::to_string(block_size) + " threads");
  }
  if (dynamic_shared_bytes > static_cast<size_t>(model().shared_per_block_optin)) {
    *blocks = 0;
    return cudaSuccess;
  }
  // Registers are not modelled: threads, shared memory and the block limit decide.
  const int warps = (block_size + 31) / 32;
  const int by_threads = model().threads_per_multiprocessor / (32 * warps);
  const int by_shared = static_cast<int>(model().shared_per_multiprocessor /
                                         (dynamic_shared_bytes + mmv::emulation::kReservedSharedPerBlock));
  *blocks = std::min({by_threads, by_shared, model().blocks_per_multiprocessor});
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------
// Ops that drive the emulator from Python.

namespace {

void set_device(std::string_view name) {
  for (int i = 0; i < mmv::emulation::kDeviceCount; ++i) {
    if (name == mmv::emulation::kDevices[i].name) {
      mmv::emulation::current = i;
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "mmv_emulated.set_device: name must be H100 or A100, got '", name, "'");
}

std::string current_device() { return mmv::emulation::model().name; }

// Until the next call, CPU tensors are allocated at the end of a guarded mapping.
void guard_allocations(bool on) {
  static c10::Allocator* previous = nullptr;
  constexpr uint8_t kPriority = 200;
  if (on && previous == nullptr) {
    previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&mmv::emulation::guarded_allocator, kPriority);
  } else if (!on && previous != nullptr) {
    c10::SetCPUAllocator(previous, kPriority);
    previous = nullptr;
  }
}

// A copy of t whose whole storage lies at the end of a guarded mapping, with t's sizes, strides and
// storage offset.
at::Tensor guarded_copy(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "mmv_emulated.guarded_copy: t must be a CPU tensor, got ", t.device());
  const c10::Storage& storage = t.storage();
  const size_t bytes = storage.nbytes();
  void* data = mmv::emulation::guarded_allocate(bytes);
  if (bytes > 0) std::memcpy(data, storage.data(), bytes);
  c10::Storage copy(c10::Storage::use_byte_size_t(), bytes,
                    c10::DataPtr(data, data, &mmv::emulation::guarded_free, c10::Device(c10::DeviceType::CPU)),
                    nullptr, false);
  return at::empty({0}, t.options()).set_(copy, t.storage_offset(), t.sizes(), t.strides());
}

// The launch bounds of the kernels, by the mangled name of nvcc's .entry: from now on a launch with
// more threads per block than its kernel's bound fails. A kernel without a row declares none.
void set_launch_bounds(const std::vector<std::string>& entries, const std::vector<int64_t>& max_threads) {
  TORCH_CHECK_VALUE(entries.size() == max_threads.size(), "mmv_emulated.set_launch_bounds: max_threads must have ",
                    entries.size(), " values, one per entry, got ", max_threads.size());
  std::map<std::string, int> bounds;
  for (size_t i = 0; i < entries.size(); ++i) {
    TORCH_CHECK_VALUE(max_threads[i] > 0, "mmv_emulated.set_launch_bounds: max_threads must be positive, got ",
                      max_threads[i], " for ", entries[i]);
    // Kernels in anonymous namespaces of different sources may share a name; the symbol does not say
    // which source a kernel came from.
    const auto [row, added] = bounds.emplace(mmv::emulation::demangle(entries[i].c_str()), max_threads[i]);
    TORCH_CHECK_VALUE(added || row->second == max_threads[i], "mmv_emulated.set_launch_bounds: two kernels named ",
                      row->first, " declare different __launch_bounds__ (", row->second, " and ", max_threads[i],
                      " threads); the emulator cannot tell them apart: rename one");
  }
  const std::lock_guard<std::mutex> lock(mmv::emulation::bounds_mutex);
  mmv::emulation::launch_bounds = std::move(bounds);
  mmv::emulation::launch_bounds_known = true;
  mmv::emulation::kernels.clear();
}

// The kernels launched (or asked about) since set_launch_bounds, demangled, and the bound the emulator
// found for each (0: it declares none).
std::tuple<std::vector<std::string>, std::vector<int64_t>> kernel_bounds() {
  const std::lock_guard<std::mutex> lock(mmv::emulation::bounds_mutex);
  std::vector<std::string> names;
  std::vector<int64_t> max_threads;
  for (const auto& [address, kernel] : mmv::emulation::kernels) {
    names.push_back(kernel.name);
    max_threads.push_back(kernel.max_threads);
  }
  return {names, max_threads};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmv_emulated, m) {
  m.def("set_launch_bounds(str[] entries, int[] max_threads) -> ()", &set_launch_bounds);
  m.def("kernel_bounds() -> (str[], int[])", &kernel_bounds);
  m.def("set_device(str name) -> ()", &set_device);
  m.def("device() -> str", &current_device);
  m.def("guard_allocations(bool on) -> ()", &guard_allocations);
  m.def("guarded_copy(Tensor t) -> Tensor", &guarded_copy);
}
