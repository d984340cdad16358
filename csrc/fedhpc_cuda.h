// Torch-free host launchers of the fedhpc CUDA kernels (raw pointers + a stream).
// bindings.cpp wraps them for Python as fedhpc._cuda; the .cu files compile with bare nvcc.
// All tensors are float32, row-major and contiguous; every launcher returns the launch status.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

extern "C" {

// Batched CholeskyQR2: X[i] = Q[i] R[i] for X [b, d, r] (d >= r, 1 <= r <= 64).
// Q [b, d, r], R [b, r, r] upper triangular with a positive diagonal, ok [b] (1 byte each).
// ok[i] = 0 when matrix i is too ill-conditioned for CholeskyQR2 in float32; its Q[i] and
// R[i] are then zero and the caller must factor it another way (Householder).
// max_diag_ratio: reject when max diag(R1) > max_diag_ratio * min diag(R1) (<= 0: no test).
cudaError_t fedhpc_cholqr2_f32(const float* X, float* Q, float* R, uint8_t* ok, int b, int d,
                               int r, float max_diag_ratio, cudaStream_t stream);

// Pairwise subspace similarity S[i, j] = scale * ||U[i]^T V[j]||_F^2 for U [n, d, r],
// V [m, d, r], S [n, m]; scale is 1 / (the caller's rank). Needs r % 4 == 0, r <= 128 and
// 16-byte aligned U and V (pad columns with zeros otherwise: they do not change S).
// symmetric != 0 asserts U == V (same pointer, n == m): only tiles on or above the diagonal
// are computed and S is mirrored, exactly symmetric.
cudaError_t fedhpc_subspace_similarity_f32(const float* U, const float* V, float* S, int n, int m,
                                           int d, int r, float scale, int symmetric,
                                           cudaStream_t stream);

}  // extern "C"
