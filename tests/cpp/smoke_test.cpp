// Smoke test of the C++ library: loading it registers the mmv ops with PyTorch's dispatcher; on tiny
// inputs they compute what docs/design.md defines (checked against direct loops in double); bad arguments
// raise c10::Error naming the argument. Calls are boxed, so the test depends on the op schemas only,
// not on the C++ signatures the kernels are written with. An op without a kernel for a device yet is
// reported as skipped; anything wrong prints a FAIL line and the exit status is 1.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#ifdef MMV_SMOKE_TEST_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  ++failures;
}

void pass(const std::string& what) { std::printf("ok   %s\n", what.c_str()); }

// Deterministic values in [-1, 1): the expected numbers must not depend on torch's generators.
class Values {
 public:
  explicit Values(uint32_t seed) : state_(seed) {}
  float next() {
    state_ = state_ * 1664525u + 1013904223u;
    return static_cast<float>(state_ >> 8) / 8388608.0f - 1.0f;
  }

 private:
  uint32_t state_;
};

at::Tensor filled(at::IntArrayRef sizes, Values& values, float scale) {
  at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(at::kFloat));
  float* data = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) data[i] = scale * values.next();
  return t;
}

at::Tensor int32_tensor(const std::vector<int32_t>& values) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kInt));
  std::copy(values.begin(), values.end(), t.data_ptr<int32_t>());
  return t;
}

// Element [i, j, k] of a 3-d float32 CPU tensor of any strides.
float at3(const at::Tensor& t, int64_t i, int64_t j, int64_t k) {
  return t.data_ptr<float>()[i * t.stride(0) + j * t.stride(1) + k * t.stride(2)];
}

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

bool has_kernel(const char* name, c10::DispatchKey key) {
  return find_op(name).hasKernelForDispatchKey(key);
}

std::vector<c10::IValue> call(const char* name, std::vector<c10::IValue> stack) {
  find_op(name).callBoxed(&stack);
  return stack;
}

// Every element within tol * (1 + |expected|) of the expected value.
void expect_close(const std::string& what, const at::Tensor& actual, const std::vector<double>& expected,
                  double tol) {
  if (actual.scalar_type() != at::kFloat || actual.numel() != static_cast<int64_t>(expected.size())) {
    fail(what + ": expected " + std::to_string(expected.size()) + " float32 values, got " +
         std::to_string(actual.numel()) + " of " + std::string(c10::toString(actual.scalar_type())));
    return;
  }
  const at::Tensor host = actual.cpu().contiguous();
  const float* data = host.data_ptr<float>();
  double worst = 0.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double error = std::abs(static_cast<double>(data[i]) - expected[i]) / (1.0 + std::abs(expected[i]));
    worst = std::isnan(error) ? INFINITY : std::max(worst, error);
  }
  char summary[64];
  std::snprintf(summary, sizeof(summary), ": max relative error %.2e (tolerance %.0e)", worst, tol);
  worst <= tol ? pass(what + summary) : fail(what + summary);
}

bool names_word(const std::string& message, const std::string& word) {
  const auto is_identifier = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (size_t at = message.find(word); at != std::string::npos; at = message.find(word, at + 1)) {
    const size_t end = at + word.size();
    if ((at == 0 || !is_identifier(message[at - 1])) && (end == message.size() || !is_identifier(message[end]))) {
      return true;
    }
  }
  return false;
}

// The call must raise c10::Error whose message names `argument`.
void expect_rejected(const std::string& what, const std::string& argument, const std::function<void()>& body) {
  try {
    body();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    if (names_word(message, argument)) {
      pass(what + " raises c10::Error naming " + argument);
    } else {
      fail(what + ": the message does not name " + argument + ": " + message);
    }
    return;
  } catch (const std::exception& e) {
    fail(what + ": raised something other than c10::Error: " + e.what());
    return;
  }
  fail(what + ": no exception");
}

// ---- rope3d ---------------------------------------------------------------------------------------

// The axis (0 z, 1 y, 2 x) whose coordinate rotates pair j, or -1 for a pair passed through.
int64_t pair_axis(int64_t j, const std::array<int64_t, 3>& sections) {
  int64_t end = 0;
  for (int64_t axis = 0; axis < 3; ++axis) {
    end += sections[axis];
    if (j < end) return axis;
  }
  return -1;
}

std::vector<double> rope3d_expected(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs,
                                    const std::array<int64_t, 3>& sections, bool interleaved) {
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), pairs = head_dim / 2;
  const float* c = coords.data_ptr<float>();
  const float* f = freqs.data_ptr<float>();
  std::vector<double> out(tokens * heads * head_dim);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      double* row = &out[(t * heads + h) * head_dim];
      for (int64_t d = 0; d < head_dim; ++d) row[d] = at3(x, t, h, d);
      for (int64_t j = 0; j < pairs; ++j) {
        const int64_t axis = pair_axis(j, sections);
        if (axis < 0) continue;
        const double theta = c[3 * t + axis] * f[j];  // the float32 product, as defined
        const int64_t iu = interleaved ? 2 * j : j, iv = interleaved ? 2 * j + 1 : j + pairs;
        const double u = at3(x, t, h, iu), v = at3(x, t, h, iv);
        row[iu] = u * std::cos(theta) - v * std::sin(theta);
        row[iv] = v * std::cos(theta) + u * std::sin(theta);
      }
    }
  }
  return out;
}

void check_rope3d(const c10::Device& device) {
  const std::string where = " on " + device.str();
  constexpr int64_t tokens = 6, heads = 3, head_dim = 40;
  // 18 rotated pairs: one 16-lane vector and a scalar tail; the last 2 pairs pass through.
  const std::array<int64_t, 3> sections{8, 6, 4};
  const std::vector<int64_t> sections_arg(sections.begin(), sections.end());
  Values values(7);
  // x is the k slice of a packed (T, 3, H, D) projection: a strided view the op must take as it is.
  const at::Tensor qkv = filled({tokens, 3, heads, head_dim}, values, 1.0f);
  const at::Tensor coords = filled({tokens, 3}, values, 5.0f);
  const at::Tensor freqs = filled({head_dim / 2}, values, 1.0f);
  const at::Tensor x = qkv.select(1, 1);
  const at::Tensor qkv_on = qkv.to(device), coords_on = coords.to(device), freqs_on = freqs.to(device);
  const at::Tensor x_on = qkv_on.select(1, 1);

  for (const bool interleaved : {false, true}) {
    const std::string layout = interleaved ? "interleaved" : "rotate-half";
    const at::Tensor out = call("mmv::rope3d", {x_on, coords_on, freqs_on, sections_arg, interleaved})[0].toTensor();
    if (out.sizes() != x.sizes()) {
      fail("rope3d " + layout + where + ": output shape differs from x's");
      continue;
    }
    expect_close("rope3d " + layout + " of a strided view" + where, out,
                 rope3d_expected(x, coords, freqs, sections, interleaved), 1e-5);
  }

  const auto rope3d_with = [&](const at::Tensor& x_arg, const at::Tensor& coords_arg, const at::Tensor& freqs_arg,
                               std::vector<int64_t> sections_value) {
    return [=] { call("mmv::rope3d", {x_arg, coords_arg, freqs_arg, sections_value, false}); };
  };
  expect_rejected("rope3d with an odd head_dim" + where, "x",
                  rope3d_with(x_on.narrow(2, 0, head_dim - 1), coords_on, freqs_on, sections_arg));
  expect_rejected("rope3d with float64 coords" + where, "coords",
                  rope3d_with(x_on, coords_on.to(at::kDouble), freqs_on, sections_arg));
  expect_rejected("rope3d with too few freqs" + where, "freqs",
                  rope3d_with(x_on, coords_on, freqs_on.narrow(0, 0, 3), sections_arg));
  expect_rejected("rope3d with sections over head_dim / 2" + where, "sections",
                  rope3d_with(x_on, coords_on, freqs_on, {head_dim, 0, 0}));
}

// ---- packed_attention -----------------------------------------------------------------------------

struct AttentionExpected {
  std::vector<double> out, lse, dq, dk, dv;
};

// Softmax attention within each sequence, and its gradients for the upstream gradient dout.
AttentionExpected attention_expected(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& dout, const std::vector<int32_t>& cu_seqlens, double scale) {
  const int64_t tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  AttentionExpected e;
  e.out.assign(tokens * heads * head_dim, 0.0);
  e.lse.assign(heads * tokens, 0.0);
  e.dq = e.out;
  e.dk = e.out;
  e.dv = e.out;
  const auto dot = [&](const at::Tensor& a, int64_t s, const at::Tensor& b, int64_t t, int64_t h) {
    double sum = 0.0;
    for (int64_t d = 0; d < head_dim; ++d) sum += static_cast<double>(at3(a, s, h, d)) * at3(b, t, h, d);
    return sum;
  };
  for (size_t b = 0; b + 1 < cu_seqlens.size(); ++b) {
    const int64_t begin = cu_seqlens[b], end = cu_seqlens[b + 1];
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t t = begin; t < end; ++t) {
        double max_score = -INFINITY;
        for (int64_t s = begin; s < end; ++s) max_score = std::max(max_score, scale * dot(q, t, k, s, h));
        double total = 0.0;
        for (int64_t s = begin; s < end; ++s) total += std::exp(scale * dot(q, t, k, s, h) - max_score);
        const double lse = max_score + std::log(total);
        e.lse[h * tokens + t] = lse;
        double* out = &e.out[(t * heads + h) * head_dim];
        for (int64_t s = begin; s < end; ++s) {
          const double p = std::exp(scale * dot(q, t, k, s, h) - lse);
          for (int64_t d = 0; d < head_dim; ++d) out[d] += p * at3(v, s, h, d);
        }
        double dout_dot_out = 0.0;
        for (int64_t d = 0; d < head_dim; ++d) dout_dot_out += at3(dout, t, h, d) * out[d];
        for (int64_t s = begin; s < end; ++s) {
          const double p = std::exp(scale * dot(q, t, k, s, h) - lse);
          const double dscore = p * (dot(dout, t, v, s, h) - dout_dot_out);
          for (int64_t d = 0; d < head_dim; ++d) {
            e.dv[(s * heads + h) * head_dim + d] += p * at3(dout, t, h, d);
            e.dq[(t * heads + h) * head_dim + d] += scale * dscore * at3(k, s, h, d);
            e.dk[(s * heads + h) * head_dim + d] += scale * dscore * at3(q, t, h, d);
          }
        }
      }
    }
  }
  return e;
}

void check_packed_attention(const c10::Device& device, c10::DispatchKey key) {
  const std::string where = " on " + device.str();
  if (!has_kernel("mmv::packed_attention_fwd", key)) {
    std::printf("skip packed_attention%s: no kernel registered for %s yet\n", where.c_str(),
                c10::toString(key));
    return;
  }
  // Lengths 3, 0 and 4; an odd head_dim; q, k, v are views of one packed (T, 3, H, D) tensor.
  constexpr int64_t tokens = 7, heads = 2, head_dim = 5, max_seqlen = 4;
  const std::vector<int32_t> cu_seqlens{0, 3, 3, 7};
  const double scale = 0.6;
  Values values(11);
  const at::Tensor qkv = filled({tokens, 3, heads, head_dim}, values, 1.0f);
  const at::Tensor dout = filled({tokens, heads, head_dim}, values, 1.0f);
  const AttentionExpected expected =
      attention_expected(qkv.select(1, 0), qkv.select(1, 1), qkv.select(1, 2), dout, cu_seqlens, scale);
  const at::Tensor qkv_on = qkv.to(device), dout_on = dout.to(device);
  const at::Tensor q = qkv_on.select(1, 0), k = qkv_on.select(1, 1), v = qkv_on.select(1, 2);
  const at::Tensor cu_on = int32_tensor(cu_seqlens).to(device);

  const auto forward = call("mmv::packed_attention_fwd", {q, k, v, cu_on, max_seqlen, scale, true, false});
  const at::Tensor out = forward[0].toTensor(), lse = forward[1].toTensor();
  expect_close("packed_attention_fwd out" + where, out, expected.out, 1e-5);
  expect_close("packed_attention_fwd lse" + where, lse, expected.lse, 1e-5);

  if (has_kernel("mmv::packed_attention_bwd", key)) {
    const auto backward = call("mmv::packed_attention_bwd",
                               {dout_on, q, k, v, out, lse, cu_on, max_seqlen, scale, true, false});
    expect_close("packed_attention_bwd dq" + where, backward[0].toTensor(), expected.dq, 1e-5);
    expect_close("packed_attention_bwd dk" + where, backward[1].toTensor(), expected.dk, 1e-5);
    expect_close("packed_attention_bwd dv" + where, backward[2].toTensor(), expected.dv, 1e-5);
  } else {
    std::printf("skip packed_attention_bwd%s: no kernel registered for %s yet\n", where.c_str(),
                c10::toString(key));
  }

  const auto forward_with = [&](const at::Tensor& k_arg, const std::vector<int32_t>& cu_arg, int64_t max_arg) {
    const at::Tensor cu_tensor = int32_tensor(cu_arg).to(device);
    return [=] { call("mmv::packed_attention_fwd", {q, k_arg, v, cu_tensor, max_arg, scale, true, false}); };
  };
  expect_rejected("packed_attention_fwd with cu_seqlens[0] != 0" + where, "cu_seqlens",
                  forward_with(k, {1, 3, 3, 7}, max_seqlen));
  expect_rejected("packed_attention_fwd with decreasing cu_seqlens" + where, "cu_seqlens",
                  forward_with(k, {0, 3, 2, 7}, max_seqlen));
  expect_rejected("packed_attention_fwd with a sequence over max_seqlen" + where, "max_seqlen",
                  forward_with(k, cu_seqlens, 3));
  expect_rejected("packed_attention_fwd with float64 k" + where, "k", forward_with(k.to(at::kDouble), cu_seqlens, max_seqlen));
}

void check_registered_schemas() {
  for (const char* name : {"mmv::rope3d", "mmv::packed_attention_fwd", "mmv::packed_attention_bwd"}) {
    if (c10::Dispatcher::singleton().findSchema({name, ""}).has_value()) {
      pass(std::string("schema ") + name + " registered");
    } else {
      fail(std::string("schema ") + name + " is not registered: is the mmv library linked?");
    }
  }
}

void check_device(const c10::Device& device, c10::DispatchKey key) {
  if (has_kernel("mmv::rope3d", key)) {
    check_rope3d(device);
  } else {
    fail(std::string("mmv::rope3d has no kernel for ") + c10::toString(key));
  }
  check_packed_attention(device, key);
}

}  // namespace

int main() {
  try {
    check_registered_schemas();
    check_device(c10::Device(c10::kCPU), c10::DispatchKey::CPU);
#ifdef MMV_SMOKE_TEST_CUDA
    if (c10::cuda::device_count() > 0) {
      check_device(c10::Device(c10::kCUDA, 0), c10::DispatchKey::CUDA);
    } else if (has_kernel("mmv::rope3d", c10::DispatchKey::CUDA)) {
      std::printf("skip CUDA: the kernels are registered, but there is no GPU to run them\n");
    } else {
      fail("mmv::rope3d has no CUDA kernel in a build with MMV_WITH_CUDA");
    }
#endif
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  std::printf("%s: %d failure(s)\n", failures == 0 ? "passed" : "FAILED", failures);
  return failures == 0 ? 0 : 1;
}
