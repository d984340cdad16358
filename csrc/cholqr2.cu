// Batched CholeskyQR2 of tall-skinny matrices: X[i] = Q[i] R[i], X [b, d, r] fp32, r <= 64.
//
// One thread block per matrix streams X[i] through shared memory in tiles of kTileRows rows:
//   sweep 1: G1 = X^T X                                   R1 = chol(G1)     (G1 = R1^T R1)
//   sweep 2: Q1 = X R1^-1 tile by tile (not stored)       R2 = chol(Q1^T Q1)
//   sweep 3: Q = (X R1^-1) R2^-1, written once            R  = R2 R1
// Sweep 3 recomputes Q1 with the same arithmetic as sweep 2 instead of storing it, so the
// traffic is 3 reads + 1 write of X-sized data, against 3 reads + 2 writes when Q1 goes
// through memory (4 + 2 for the unfused op sequence), with no Q1 buffer and one launch.
// The Gram matrices are summed in two levels of fp32 (within a tile, then across tiles; the
// threads sharing a micro-tile are combined in fp64); the r x r Choleskys run in fp64 in
// shared memory. Triangular solves are row-by-row substitutions
// (one tile row per thread, in registers), as torch.linalg.solve_triangular computes them.
//
// A matrix gets ok = 0 (and zero Q, R) when CholeskyQR2 cannot be trusted in fp32, by the
// rule of fedhpc/kernels/cholqr/reference.py (`accepted`):
//   - a non-positive or NaN pivot in either Cholesky;
//   - max |Q1^T Q1 - I| > tolerance: Q1 is too far from orthonormal (drift ~ u cond(X)^2)
//     for the second pass to restore orthogonality to fp32 precision;
//   - optionally (max_diag_ratio > 0), max diag(R1) > max_diag_ratio * min diag(R1), a lower
//     bound on cond(X) that rejects hopeless matrices before sweeps 2 and 3.
// The caller factors those matrices with Householder QR.

#include <cfloat>
#include <cstdint>

#include <cuda_runtime.h>

#include "fedhpc_cuda.h"

namespace {

constexpr int kThreads = 256;            // one tile row per thread in the substitutions
constexpr int kTileRows = kThreads;      // rows of X staged in shared memory per step
constexpr int kMaxRank = 64;
constexpr int kLoadBatch = 4;            // float4 loads in flight per thread per tile

// Shared-memory plan for the padded rank RP (r <= RP, RP in {8, 16, 32, 64}). Columns r..RP-1
// and rows past d of a tile are zero, so no inner loop needs a bounds check.
template <int RP>
struct Plan {
  static constexpr int kLd = RP + 4;         // tile row stride: float4 aligned; the +4 makes the
                                             // one-row-per-thread float4 accesses conflict-free
  static constexpr int kMt = 4;              // Gram micro-tile (kMt x kMt, one float4 per side)
  static constexpr int kTps = RP / kMt;      // micro-tiles per side of the RP x RP Gram
  static constexpr int kSplit = kThreads / (kTps * kTps);  // threads sharing one micro-tile,
                                                           // each summing every kSplit-th row
  static constexpr int kTileBytes = kTileRows * kLd * 4;
  // After a sweep the tile area holds the per-thread partial Grams and the reduced Gram.
  static constexpr int kPartialBytes = kThreads * kMt * kMt * 4;
  static constexpr int kGramBytes = RP * RP * 8;
  static constexpr int kScratchBytes =
      kTileBytes > kPartialBytes + kGramBytes ? kTileBytes : kPartialBytes + kGramBytes;
  static constexpr int kFactorBytes = RP * RP * 4;  // R1 or R2, fp32
  // scratch + R1 + R2 + 1/diag(R1) + 1/diag(R2) + per-row drift of Q1^T Q1 (fp64)
  static constexpr int kSmemBytes = kScratchBytes + 2 * kFactorBytes + 2 * RP * 4 + RP * 8;
  // Co-resident blocks per SM the registers are sized for (65536 / (kThreads * kMinBlocks) each,
  // chosen so that ptxas needs no spills). RP = 64 keeps q[64] in registers: one block per SM,
  // which suits its compute-bound regime.
  static constexpr int kMinBlocks = RP == 64 ? 1 : RP == 32 ? 2 : 3;
  static_assert(kMinBlocks * kSmemBytes <= 227 * 1024, "shared memory would cap occupancy");
  static_assert(kSplit >= 1 && kThreads % (kTps * kTps) == 0, "Gram tiling must cover the block");
  static_assert(kSmemBytes <= 227 * 1024, "over the H100 per-block shared memory limit");
};
// Shared memory per block (bytes): RP=8: 17,536  RP=16: 22,784  RP=32: 45,568  RP=64: 103,424.

// Stage rows [row0, row0 + kTileRows) of the d x r matrix X into tile [kTileRows][kLd],
// zero-filling columns >= r and rows >= d. Global reads are coalesced: the rows of a tile
// are one contiguous chunk of X.
template <int RP>
__device__ void load_tile(float* tile, const float* X, int row0, int d, int r, bool vec4) {
  constexpr int kLd = Plan<RP>::kLd;
  const int t = threadIdx.x;
  const int rows = min(kTileRows, d - row0);
  const float* src = X + static_cast<int64_t>(row0) * r;
  // Thread t zeroes the padding of row t; the data entries below never overlap it.
  for (int c = t < rows ? r : 0; c < RP; ++c) tile[t * kLd + c] = 0.f;
  if (vec4) {
    const int r4 = r / 4, n4 = rows * r4;
    const float4* src4 = reinterpret_cast<const float4*>(src);
#pragma unroll
    for (int s0 = 0; s0 < RP / 4; s0 += kLoadBatch) {
      float4 v[kLoadBatch];
#pragma unroll
      for (int s = 0; s < kLoadBatch; ++s) {
        const int f = t + (s0 + s) * kThreads;
        if (f < n4) v[s] = src4[f];
      }
#pragma unroll
      for (int s = 0; s < kLoadBatch; ++s) {
        const int f = t + (s0 + s) * kThreads;
        if (f < n4) {
          const int i = f / r4;
          *reinterpret_cast<float4*>(tile + i * kLd + (f - i * r4) * 4) = v[s];
        }
      }
    }
  } else {  // r % 4 != 0 or unaligned X: correct, not tuned
    for (int f = t; f < rows * r; f += kThreads) {
      const int i = f / r;
      tile[i * kLd + f - i * r] = src[f];
    }
  }
}

// Write rows [row0, row0 + kTileRows) of the tile (first r columns) to the d x r matrix Q.
template <int RP>
__device__ void store_tile(float* Q, const float* tile, int row0, int d, int r, bool vec4) {
  constexpr int kLd = Plan<RP>::kLd;
  const int rows = min(kTileRows, d - row0);
  float* dst = Q + static_cast<int64_t>(row0) * r;
  if (vec4) {
    const int r4 = r / 4;
    for (int f = threadIdx.x; f < rows * r4; f += kThreads) {
      const int i = f / r4;
      reinterpret_cast<float4*>(dst)[f] =
          *reinterpret_cast<const float4*>(tile + i * kLd + (f - i * r4) * 4);
    }
  } else {
    for (int f = threadIdx.x; f < rows * r; f += kThreads) {
      const int i = f / r;
      dst[f] = tile[i * kLd + f - i * r];
    }
  }
}

// q <- q U^-1 for a row vector q and an upper-triangular U [RP][RP] (zero past column r):
// forward substitution on q U = x, in registers. U is read with broadcast loads.
template <int RP>
__device__ __forceinline__ void solve_upper(float (&q)[RP], const float* U, const float* inv_diag,
                                            int r) {
#pragma unroll
  for (int j = 0; j < RP; ++j) {
    if (j >= r) break;  // block-uniform
    q[j] *= inv_diag[j];
#pragma unroll
    for (int k = j + 1; k < RP; ++k) q[k] = fmaf(-q[j], U[j * RP + k], q[k]);
  }
}

// Thread t replaces row t of the tile by row t of tile * U1^-1 (then * U2^-1 if kTwo).
template <int RP, bool kTwo>
__device__ void solve_tile_rows(float* tile, const float* U1, const float* inv1, const float* U2,
                                const float* inv2, int r) {
  float4* row = reinterpret_cast<float4*>(tile + threadIdx.x * Plan<RP>::kLd);
  float q[RP];
#pragma unroll
  for (int c = 0; c < RP / 4; ++c) {
    const float4 v = row[c];
    q[4 * c] = v.x, q[4 * c + 1] = v.y, q[4 * c + 2] = v.z, q[4 * c + 3] = v.w;
  }
  solve_upper<RP>(q, U1, inv1, r);
  if (kTwo) solve_upper<RP>(q, U2, inv2, r);
#pragma unroll
  for (int c = 0; c < RP / 4; ++c)
    row[c] = make_float4(q[4 * c], q[4 * c + 1], q[4 * c + 2], q[4 * c + 3]);
}

// Per-thread share of G = T^T T over the tiles T of one sweep. Thread t owns the kMt x kMt
// micro-tile (p0.., q0..) of G and the rows i = split, split + kSplit, ... of every tile.
// Sums run in fp32 within a tile, then across tiles (two-level summation: the error grows
// with kTileRows / kSplit + d / kTileRows terms, not with d).
template <int RP>
struct GramAccumulator {
  using P = Plan<RP>;
  int split, p0, q0;
  float total[P::kMt][P::kMt];

  __device__ GramAccumulator() {
    const int tile_id = threadIdx.x % (P::kTps * P::kTps);
    split = threadIdx.x / (P::kTps * P::kTps);
    p0 = tile_id / P::kTps * P::kMt;
    q0 = tile_id % P::kTps * P::kMt;
#pragma unroll
    for (int a = 0; a < P::kMt; ++a)
#pragma unroll
      for (int c = 0; c < P::kMt; ++c) total[a][c] = 0.f;
  }

  __device__ void add_tile(const float* tile) {
    float part[P::kMt][P::kMt] = {};
#pragma unroll 2
    for (int k = 0; k < kTileRows / P::kSplit; ++k) {
      const int i = split + k * P::kSplit;
      const float4 x = *reinterpret_cast<const float4*>(tile + i * P::kLd + p0);
      const float4 y = *reinterpret_cast<const float4*>(tile + i * P::kLd + q0);
      const float xa[4] = {x.x, x.y, x.z, x.w}, ya[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int a = 0; a < P::kMt; ++a)
#pragma unroll
        for (int c = 0; c < P::kMt; ++c) part[a][c] = fmaf(xa[a], ya[c], part[a][c]);
    }
#pragma unroll
    for (int a = 0; a < P::kMt; ++a)
#pragma unroll
      for (int c = 0; c < P::kMt; ++c) total[a][c] += part[a][c];
  }

  // G [RP][RP] = sum over the kSplit threads of each micro-tile, in a fixed order (the
  // result does not depend on scheduling). Starts after the last tile has been consumed.
  __device__ void reduce(float* partials, double* G) const {
    __syncthreads();  // the tile area becomes `partials`
#pragma unroll
    for (int a = 0; a < P::kMt; ++a)
#pragma unroll
      for (int c = 0; c < P::kMt; ++c)
        partials[(threadIdx.x * P::kMt + a) * P::kMt + c] = total[a][c];
    __syncthreads();
    for (int e = threadIdx.x; e < RP * RP; e += kThreads) {
      const int p = e / RP, q = e % RP;
      const int owner = p / P::kMt * P::kTps + q / P::kMt;  // micro-tile id of (p, q)
      const int slot = (p % P::kMt) * P::kMt + q % P::kMt;
      double g = 0.0;
      for (int s = 0; s < P::kSplit; ++s)
        g += partials[(s * P::kTps * P::kTps + owner) * P::kMt * P::kMt + slot];
      G[e] = g;
    }
    __syncthreads();
  }
};

// Right-looking Cholesky G = U^T U of the leading r x r block of G [RP][RP] (fp64, destroyed),
// one __syncthreads per column. Writes U [RP][RP] (fp32, zero below the diagonal and outside
// the leading r x r block) and inv_diag[:r] = 1 / diag(U). Every thread reads the same
// pivots, so the verdict is block-uniform. Returns false on a non-positive or NaN pivot, or
// when max diag(U) > max_ratio * min diag(U) (max_ratio <= 0: no ratio test).
template <int RP>
__device__ bool cholesky_upper(double* G, float* U, float* inv_diag, int r, float max_ratio) {
  const int t = threadIdx.x;
  for (int e = t; e < RP * RP; e += kThreads) {
    const int p = e / RP, q = e % RP;
    if (p >= r || q >= r || q < p) U[e] = 0.f;  // the rest is set column by column below
  }
  // Trailing updates run on a 16 x 16 thread grid: no integer division in the loop.
  const int ti = t / 16, tj = t % 16;
  double dmin = DBL_MAX, dmax = 0.0;
  for (int j = 0; j < r; ++j) {
    const double pivot = G[j * RP + j];
    if (!(pivot > 0.0)) return false;
    const double dj = sqrt(pivot), inv = 1.0 / dj;
    dmin = fmin(dmin, dj);
    dmax = fmax(dmax, dj);
    for (int k = j + t; k < r; k += kThreads)
      U[j * RP + k] = static_cast<float>(k == j ? dj : G[j * RP + k] * inv);
    if (t == 0) inv_diag[j] = static_cast<float>(inv);
    // Row j is read, never written, in this step: only rows p > j change.
    for (int p = j + 1 + ti; p < r; p += 16) {
      const double gp = G[j * RP + p] / pivot;
      for (int q = j + 1 + tj; q < r; q += 16) G[p * RP + q] -= gp * G[j * RP + q];
    }
    __syncthreads();
  }
  return !(max_ratio > 0.f) || dmax <= static_cast<double>(max_ratio) * dmin;
}

// max |G[p][q] - delta_pq| over the leading r x r block of G [RP][RP]; block-uniform.
// NaN entries make it NaN, which fails every `drift <= tolerance` test.
template <int RP>
__device__ double identity_drift(const double* G, double* row_drift, int r) {
  for (int p = threadIdx.x; p < r; p += kThreads) {
    double m = 0.0;
    for (int q = 0; q < r; ++q) {
      const double e = fabs(G[p * RP + q] - (p == q ? 1.0 : 0.0));
      m = e > m || isnan(e) ? e : m;  // keeps a NaN, unlike fmax
    }
    row_drift[p] = m;
  }
  __syncthreads();
  double drift = 0.0;
  for (int p = 0; p < r; ++p)
    drift = row_drift[p] > drift || isnan(row_drift[p]) ? row_drift[p] : drift;
  return drift;
}

template <int RP>
__global__ void __launch_bounds__(kThreads, Plan<RP>::kMinBlocks)
cholqr2_kernel(const float* __restrict__ X, float* __restrict__ Q, float* __restrict__ R,
               uint8_t* __restrict__ ok, int d, int r, float tolerance, float max_diag_ratio,
               bool vec4) {
  using P = Plan<RP>;
  extern __shared__ __align__(16) unsigned char smem[];
  float* tile = reinterpret_cast<float*>(smem);                               // [kTileRows][kLd]
  float* partials = reinterpret_cast<float*>(smem);                            // after a sweep
  double* gram = reinterpret_cast<double*>(smem + P::kPartialBytes);           // [RP][RP]
  float* r1 = reinterpret_cast<float*>(smem + P::kScratchBytes);               // [RP][RP]
  float* r2 = r1 + RP * RP;                                                    // [RP][RP]
  float* inv1 = r2 + RP * RP;                                                  // [RP]
  float* inv2 = inv1 + RP;                                                     // [RP]
  double* row_drift = reinterpret_cast<double*>(inv2 + RP);                    // [RP]

  const int64_t mat = blockIdx.x;
  X += mat * d * r;
  Q += mat * d * r;
  R += mat * r * r;

  // Sweep 1: G1 = X^T X, R1 = chol(G1).
  GramAccumulator<RP> g1;
  for (int row0 = 0; row0 < d; row0 += kTileRows) {
    __syncthreads();  // the previous tile is consumed
    load_tile<RP>(tile, X, row0, d, r, vec4);
    __syncthreads();
    g1.add_tile(tile);
  }
  g1.reduce(partials, gram);
  bool good = cholesky_upper<RP>(gram, r1, inv1, r, max_diag_ratio);

  // Sweep 2: G2 = Q1^T Q1 with Q1 = X R1^-1 rebuilt per tile, R2 = chol(G2).
  if (good) {
    GramAccumulator<RP> g2;
    for (int row0 = 0; row0 < d; row0 += kTileRows) {
      __syncthreads();
      load_tile<RP>(tile, X, row0, d, r, vec4);
      __syncthreads();
      solve_tile_rows<RP, false>(tile, r1, inv1, nullptr, nullptr, r);
      __syncthreads();
      g2.add_tile(tile);
    }
    g2.reduce(partials, gram);
    good = identity_drift<RP>(gram, row_drift, r) <= tolerance &&
           cholesky_upper<RP>(gram, r2, inv2, r, 0.f);
  }

  if (!good) {  // block-uniform: zero Q and R, let the caller fall back
    for (int64_t e = threadIdx.x; e < static_cast<int64_t>(d) * r; e += kThreads) Q[e] = 0.f;
    for (int e = threadIdx.x; e < r * r; e += kThreads) R[e] = 0.f;
    if (threadIdx.x == 0) ok[mat] = 0;
    return;
  }

  // Sweep 3: Q = (X R1^-1) R2^-1, the same Q1 arithmetic as sweep 2.
  for (int row0 = 0; row0 < d; row0 += kTileRows) {
    __syncthreads();
    load_tile<RP>(tile, X, row0, d, r, vec4);
    __syncthreads();
    solve_tile_rows<RP, true>(tile, r1, inv1, r2, inv2, r);
    __syncthreads();
    store_tile<RP>(Q, tile, row0, d, r, vec4);
  }

  // R = R2 R1 (both upper triangular), accumulated in fp64.
  for (int e = threadIdx.x; e < r * r; e += kThreads) {
    const int p = e / r, q = e % r;
    double s = 0.0;
    for (int k = p; k <= q; ++k) s += static_cast<double>(r2[p * RP + k]) * r1[k * RP + q];
    R[e] = static_cast<float>(s);
  }
  if (threadIdx.x == 0) ok[mat] = 1;
}

template <int RP>
cudaError_t launch(const float* X, float* Q, float* R, uint8_t* ok, int b, int d, int r,
                   float tolerance, float max_diag_ratio, cudaStream_t stream) {
  const bool vec4 = r % 4 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(Q) % 16 == 0;
  constexpr int kSmem = Plan<RP>::kSmemBytes;
  const cudaError_t err = cudaFuncSetAttribute(cholqr2_kernel<RP>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  cholqr2_kernel<RP><<<b, kThreads, kSmem, stream>>>(X, Q, R, ok, d, r, tolerance, max_diag_ratio,
                                                     vec4);
  return cudaGetLastError();
}

}  // namespace

extern "C" int fedhpc_cholqr2_f32(const float* X, float* Q, float* R, uint8_t* ok, int b, int d,
                                  int r, float tolerance, float max_diag_ratio,
                                  void* stream_handle) {
  if (b < 0 || r < 1 || r > kMaxRank || d < r || !(tolerance > 0.f)) return cudaErrorInvalidValue;
  if (b == 0) return cudaSuccess;
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  if (r <= 8) return launch<8>(X, Q, R, ok, b, d, r, tolerance, max_diag_ratio, stream);
  if (r <= 16) return launch<16>(X, Q, R, ok, b, d, r, tolerance, max_diag_ratio, stream);
  if (r <= 32) return launch<32>(X, Q, R, ok, b, d, r, tolerance, max_diag_ratio, stream);
  return launch<64>(X, Q, R, ok, b, d, r, tolerance, max_diag_ratio, stream);
}
