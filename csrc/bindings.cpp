// fedhpc._cuda: torch bindings of the launchers in fedhpc_cuda.h. Inputs are validated here,
// with the offending value in the message; kernels run on the tensor's current CUDA stream.
// Only device-generic c10 APIs are used, so this file needs no CUDA headers.
#include <torch/extension.h>

#include <cstdint>
#include <limits>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "fedhpc_cuda.h"

namespace {

constexpr int64_t kCholQRMaxRank = 64;
constexpr int64_t kSimilarityMaxRank = 128;

void check_input(const torch::Tensor& x, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, op, ": ", name, " must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be ", shape, ", got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name,
              " must be contiguous (call .contiguous()), got strides ", x.strides());
}

void check_launch(int status, const char* op) {
  TORCH_CHECK(status == 0, op, ": kernel launch failed: ", fedhpc_cuda_error_string(status));
}

// The cudaStream_t of torch's current stream on `device`.
void* current_stream(const torch::Device& device) {
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
}

int to_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), op, ": ", what, " = ", v, " exceeds int32");
  return static_cast<int>(v);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> cholqr2(const torch::Tensor& X,
                                                                double tolerance,
                                                                double max_diag_ratio) {
  constexpr const char* op = "fedhpc._cuda.cholqr2";
  check_input(X, op, "X", "[b, d, r]");
  TORCH_CHECK(tolerance > 0.0, op, ": tolerance must be > 0, got ", tolerance);
  const int64_t b = X.size(0), d = X.size(1), r = X.size(2);
  TORCH_CHECK(r >= 1 && r <= kCholQRMaxRank, op, ": r must be in [1, ", kCholQRMaxRank,
              "], got X of shape ", X.sizes());
  TORCH_CHECK(d >= r, op, ": X must be tall (d >= r), got X of shape ", X.sizes());

  const c10::DeviceGuard guard(X.device());
  auto Q = torch::empty_like(X);
  auto R = torch::empty({b, r, r}, X.options());
  auto ok = torch::empty({b}, X.options().dtype(torch::kBool));
  // A bool tensor holds one byte per element, 0 or 1: what the kernel writes.
  check_launch(fedhpc_cholqr2_f32(X.data_ptr<float>(), Q.data_ptr<float>(), R.data_ptr<float>(),
                                  reinterpret_cast<uint8_t*>(ok.data_ptr<bool>()),
                                  to_int(b, op, "b"), to_int(d, op, "d"), static_cast<int>(r),
                                  static_cast<float>(tolerance), static_cast<float>(max_diag_ratio),
                                  current_stream(X.device())),
               op);
  return {Q, R, ok};
}

torch::Tensor subspace_similarity(const torch::Tensor& U, const torch::Tensor& V) {
  constexpr const char* op = "fedhpc._cuda.subspace_similarity";
  check_input(U, op, "U", "[n, d, r]");
  check_input(V, op, "V", "[m, d, r]");
  TORCH_CHECK(U.device() == V.device(), op, ": U and V must be on one device, got ", U.device(),
              " and ", V.device());
  TORCH_CHECK(U.size(1) == V.size(1) && U.size(2) == V.size(2), op,
              ": U [n, d, r] and V [m, d, r] must share d and r, got ", U.sizes(), " and ",
              V.sizes());
  const int64_t n = U.size(0), m = V.size(0), d = U.size(1), r = U.size(2);
  TORCH_CHECK(r >= 1 && r <= kSimilarityMaxRank, op, ": r must be in [1, ", kSimilarityMaxRank,
              "], got ", r);
  // U is V: compute the upper triangle and mirror it.
  const bool symmetric = U.data_ptr() == V.data_ptr() && U.sizes() == V.sizes();

  const c10::DeviceGuard guard(U.device());
  auto S = torch::empty({n, m}, U.options());
  if (n == 0 || m == 0) return S;
  // The kernel wants r % 4 == 0 and a 16-byte aligned start: zero columns do not change
  // ||U_i^T V_j||_F, so pad to rq columns (a copy, only for such ranks or unaligned views).
  const int64_t rq = (r + 3) / 4 * 4;
  const int64_t max_n = 65535 * (128 / rq);  // gridDim.y covers n in tiles of 128 / rq clients
  TORCH_CHECK(n <= max_n, op, ": n = ", n, " exceeds the kernel's limit of ", max_n,
              " bases for r = ", r, " (split U into row blocks)");
  auto prepare = [&](const torch::Tensor& x) {
    if (rq != r) return torch::constant_pad_nd(x, {0, rq - r});
    return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 ? x : x.clone();
  };
  const auto Up = prepare(U);
  const auto Vp = symmetric ? Up : prepare(V);
  check_launch(fedhpc_subspace_similarity_f32(
                   Up.data_ptr<float>(), Vp.data_ptr<float>(), S.data_ptr<float>(),
                   to_int(n, op, "n"), to_int(m, op, "m"), to_int(d, op, "d"),
                   static_cast<int>(rq), static_cast<float>(1.0 / static_cast<double>(r)),
                   symmetric ? 1 : 0, current_stream(U.device())),
               op);
  return S;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fedhpc CUDA kernels (see csrc/README.md). float32, contiguous, CUDA tensors only.";
  m.def("cholqr2", &cholqr2,
        "Batched CholeskyQR2 of X [b, d, r] (d >= r, r <= 64) -> (Q [b, d, r], R [b, r, r], "
        "ok [b] bool), X = Q R, diag(R) > 0. ok is False where a Cholesky breaks down or "
        "max|Q1^T Q1 - I| > tolerance after the first pass (the rule of "
        "fedhpc.kernels.cholqr.reference.accepted); there Q and R are zero and the matrix must "
        "be factored with Householder QR. max_diag_ratio > 0 also rejects matrices whose "
        "max diag(R1) / min diag(R1) exceeds it, before the second pass.",
        py::arg("X"), py::arg("tolerance") = 0.1, py::arg("max_diag_ratio") = 0.0);
  m.def("subspace_similarity", &subspace_similarity,
        "S [n, m] with S[i, j] = ||U[i]^T V[j]||_F^2 / r for U [n, d, r], V [m, d, r] "
        "(r <= 128). Passing the same tensor twice computes the upper triangle only; S is "
        "then exactly symmetric.",
        py::arg("U"), py::arg("V"));
}
