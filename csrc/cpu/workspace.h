// Scratch memory for one op call, kept by the calling thread for its next call.
//
// Training calls the same op with the same shapes at every step; fresh multi-megabyte buffers would
// page-fault on every call. A call reserves all it needs up front and carves it into 64-byte aligned
// pieces; the memory is kept for the thread's next call unless it exceeds kRetainBytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

namespace mmv {

class Workspace {
 public:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kRetainBytes = size_t{256} << 20;

  // Bytes a piece of `count` elements of T occupies, alignment included: sum these for reserve().
  template <typename T>
  static size_t bytes_for(size_t count) {
    return (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
  }

  // Reserves `bytes` for this thread's call; the returned scope hands out pieces and releases
  // oversized memory when it ends.
  class Scope {
   public:
    explicit Scope(size_t bytes) : ws_(this_thread()) {
      if (bytes > ws_.capacity_) {
        ws_.data_.reset();
        ws_.data_.reset(static_cast<std::byte*>(::operator new(bytes, std::align_val_t(kAlign))));
        ws_.capacity_ = bytes;
      }
      ws_.used_ = 0;
    }
    ~Scope() {
      if (ws_.capacity_ > kRetainBytes) {
        ws_.data_.reset();
        ws_.capacity_ = 0;
      }
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

    template <typename T>
    T* take(size_t count) {
      const size_t bytes = bytes_for<T>(count);
      if (ws_.used_ + bytes > ws_.capacity_) throw std::bad_alloc();  // a reserve() that was too small
      T* piece = reinterpret_cast<T*>(ws_.data_.get() + ws_.used_);
      ws_.used_ += bytes;
      return piece;
    }

   private:
    Workspace& ws_;
  };

 private:
  struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete(p, std::align_val_t(kAlign)); }
  };
  static Workspace& this_thread() {
    thread_local Workspace workspace;
    return workspace;
  }
  std::unique_ptr<std::byte, AlignedDelete> data_;
  size_t capacity_ = 0;
  size_t used_ = 0;
};

}  // namespace mmv
