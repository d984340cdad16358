// Host launchers of the fedhpc CUDA kernels: raw pointers, sizes and a CUDA stream passed as
// void*. Neither torch nor CUDA types appear here, so the .cu files build with bare nvcc and
// bindings.cpp (fedhpc._cuda) builds with the host compiler and torch headers alone.
// All tensors are float32, row-major and contiguous. Each launcher returns a cudaError_t
// value (0: launched); fedhpc_cuda_error_string names it.
#pragma once

#include <cstdint>

extern "C" {

// Batched CholeskyQR2: X[i] = Q[i] R[i] for X [b, d, r] (d >= r, 1 <= r <= 64).
// Q [b, d, r], R [b, r, r] upper triangular with a positive diagonal, ok [b] (1 byte each).
// ok[i] = 0 when CholeskyQR2 cannot be trusted for matrix i in float32 (a Cholesky breaks
// down, or max |Q1^T Q1 - I| > tolerance after the first pass, Q1 = X R1^-1); its Q[i] and
// R[i] are then zero and the caller must factor it another way (Householder).
// max_diag_ratio > 0 also rejects when max diag(R1) > max_diag_ratio * min diag(R1), before
// the second and third sweeps (<= 0: no such test).
int fedhpc_cholqr2_f32(const float* X, float* Q, float* R, uint8_t* ok, int b, int d, int r,
                       float tolerance, float max_diag_ratio, void* stream);

// Pairwise subspace similarity S[i, j] = scale * ||U[i]^T V[j]||_F^2 for U [n, d, r],
// V [m, d, r], S [n, m]; scale is 1 / (the caller's rank). Needs r % 4 == 0, r <= 128 and
// 16-byte aligned U and V (pad columns with zeros otherwise: they do not change S).
// symmetric != 0 asserts U == V (same pointer, n == m): only tiles on or above the diagonal
// are computed and S is mirrored, exactly symmetric.
int fedhpc_subspace_similarity_f32(const float* U, const float* V, float* S, int n, int m, int d,
                                   int r, float scale, int symmetric, void* stream);

// cudaGetErrorString of a launcher's return value.
const char* fedhpc_cuda_error_string(int status);

}  // extern "C"
