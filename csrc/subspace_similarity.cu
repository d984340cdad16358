// Pairwise subspace similarity S[i, j] = scale * ||U_i^T V_j||_F^2, U [n, d, r], V [m, d, r]
// fp32 row-major, r % 4 == 0, r <= 128 (scale = 1 / rank; the binding pads other ranks with
// zero columns, which change no norm).
//
// It is the GEMM C = [U_1 .. U_n]^T [V_1 .. V_m] ((n r) x (m r), K = d) with an epilogue that
// squares C and sums each r x r block; C never leaves registers. One block computes a
// kTile x kTile tile of C holding kTile / r clients per side (columns past that are zero).
// The K loop streams d in kBk-row chunks through double-buffered shared memory (prefetch into
// registers, one __syncthreads per chunk), each thread accumulating an 8 x 8 fp32 micro-tile
// made of four 4 x 4 quadrants. As r % 4 == 0, a quadrant lies inside one r x r block: its
// sum of squares goes to a [kQuads][kQuads] grid in shared memory, which is then summed per
// client pair in a fixed order, so S does not depend on scheduling.
// symmetric (U == V): blocks below the diagonal exit at once and S is mirrored; diagonal
// tiles write each pair once, so S is exactly symmetric.

#include <cstdint>

#include <cuda_runtime.h>

#include "fedhpc_cuda.h"

namespace {

constexpr int kThreads = 256;      // a 16 x 16 grid of threads
constexpr int kTile = 128;         // rows (= columns) of the C tile per block
constexpr int kBk = 8;             // rows of d per K step
constexpr int kHalf = kTile / 2;   // a thread's rows are ty*4 + [0,4) and kHalf + ty*4 + [0,4)
constexpr int kQuads = kTile / 4;  // 4 x 4 quadrants per side of the tile
constexpr int kMaxRank = kTile;
// Shared memory (static): A and B chunks, double-buffered: 2 * 2 * kBk * kTile * 4 = 16 KiB;
// the quadrant grid (kQuads^2 * 4 = 4 KiB) reuses the A buffers after the K loop.
static_assert(kThreads == 256 && kTile == 128, "16 x 16 threads cover 128 x 128 in 8 x 8 tiles");
static_assert(kQuads * kQuads <= 2 * kBk * kTile, "the quadrant grid must fit in the A buffers");

// One thread's share of a kBk x kTile chunk of U or V: clients c = 0 .. kTile/r - 1 of the tile,
// rows k0 + [0, kBk), each row r floats. Rows of one client are contiguous in global memory,
// and kTile / r * kBk * r / 4 <= kThreads, so one float4 per thread covers the chunk.
struct ChunkLoader {
  const float* src;  // this thread's float4 at k0 = 0; null when out of range
  int smem_off;      // its place in the [kBk][kTile] chunk; -1 when the thread loads nothing
  int row;           // its row within the chunk

  __device__ ChunkLoader(const float* base, int client0, int clients, int d, int r) {
    const int r4 = r / 4, t = threadIdx.x;
    const int c = t / (kBk * r4), rem = t % (kBk * r4);
    row = rem / r4;
    const int col = (rem % r4) * 4;
    const bool in_tile = c < kTile / r;
    smem_off = in_tile ? row * kTile + c * r + col : -1;
    src = in_tile && client0 + c < clients
              ? base + (static_cast<int64_t>(client0 + c) * d + row) * r + col
              : nullptr;
  }

  __device__ float4 load(int k0, int d, int r) const {
    if (src == nullptr || k0 + row >= d) return make_float4(0.f, 0.f, 0.f, 0.f);
    return *reinterpret_cast<const float4*>(src + static_cast<int64_t>(k0) * r);
  }

  __device__ void store(float* chunk, float4 v) const {
    if (smem_off >= 0) *reinterpret_cast<float4*>(chunk + smem_off) = v;
  }
};

__global__ void __launch_bounds__(kThreads, 2)
subspace_similarity_kernel(const float* __restrict__ U, const float* __restrict__ V,
                           float* __restrict__ S, int n, int m, int d, int r, float scale,
                           bool symmetric) {
  if (symmetric && blockIdx.y > blockIdx.x) return;  // the mirror of an upper tile
  __shared__ __align__(16) float As[2][kBk * kTile];
  __shared__ __align__(16) float Bs[2][kBk * kTile];

  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  const int per_tile = kTile / r;  // clients per tile side
  const int i0 = blockIdx.y * per_tile, j0 = blockIdx.x * per_tile;
  const ChunkLoader a_ld(U, i0, n, d, r), b_ld(V, j0, m, d, r);

  // Columns no client covers are never loaded: zero them once, in both buffers.
  for (int e = t; e < 2 * kBk * kTile; e += kThreads) {
    (&As[0][0])[e] = 0.f;
    (&Bs[0][0])[e] = 0.f;
  }
  __syncthreads();
  a_ld.store(As[0], a_ld.load(0, d, r));
  b_ld.store(Bs[0], b_ld.load(0, d, r));
  __syncthreads();

  float acc[8][8] = {};
  int buf = 0;
  for (int k0 = 0; k0 < d; k0 += kBk) {
    // Fetch the next chunk into registers while this one is multiplied.
    const bool more = k0 + kBk < d;
    float4 a_next, b_next;
    if (more) {
      a_next = a_ld.load(k0 + kBk, d, r);
      b_next = b_ld.load(k0 + kBk, d, r);
    }
#pragma unroll
    for (int kk = 0; kk < kBk; ++kk) {
      const float* a_row = As[buf] + kk * kTile;
      const float* b_row = Bs[buf] + kk * kTile;
      const float4 a0 = *reinterpret_cast<const float4*>(a_row + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(a_row + kHalf + ty * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(b_row + tx * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(b_row + kHalf + tx * 4);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (more) {  // the other buffer was last read before the previous __syncthreads
      a_ld.store(As[buf ^ 1], a_next);
      b_ld.store(Bs[buf ^ 1], b_next);
    }
    __syncthreads();
    buf ^= 1;
  }

  // Quadrant (hi, hj) of this thread: rows hi*kHalf + ty*4 + [0,4), cols hj*kHalf + tx*4 + [0,4).
  float* quad = &As[0][0];  // [kQuads][kQuads]; the K loop ended with __syncthreads
#pragma unroll
  for (int hi = 0; hi < 2; ++hi)
#pragma unroll
    for (int hj = 0; hj < 2; ++hj) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float c = acc[hi * 4 + i][hj * 4 + j];
          s = fmaf(c, c, s);
        }
      quad[(hi * kQuads / 2 + ty) * kQuads + hj * kQuads / 2 + tx] = s;
    }
  __syncthreads();

  // Client pair (ci, cj) of the tile covers quadrants [ci r/4, (ci+1) r/4) x [cj r/4, (cj+1) r/4).
  const int r4 = r / 4;
  for (int p = t; p < per_tile * per_tile; p += kThreads) {
    const int ci = p / per_tile, cj = p % per_tile;
    const int gi = i0 + ci, gj = j0 + cj;
    if (gi >= n || gj >= m || (symmetric && gi > gj)) continue;
    float s = 0.f;
    for (int u = ci * r4; u < (ci + 1) * r4; ++u)
      for (int v = cj * r4; v < (cj + 1) * r4; ++v) s += quad[u * kQuads + v];
    s *= scale;
    S[static_cast<int64_t>(gi) * m + gj] = s;
    if (symmetric && gi != gj) S[static_cast<int64_t>(gj) * m + gi] = s;
  }
}

}  // namespace

extern "C" int fedhpc_subspace_similarity_f32(const float* U, const float* V, float* S, int n,
                                              int m, int d, int r, float scale, int symmetric,
                                              void* stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(U) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(V) % 16 == 0;
  if (n < 0 || m < 0 || d < 0 || r < 4 || r > kMaxRank || r % 4 != 0 || !aligned ||
      (symmetric && (U != V || n != m)))
    return cudaErrorInvalidValue;
  if (n == 0 || m == 0) return cudaSuccess;
  const int per_tile = kTile / r;
  const dim3 grid((m + per_tile - 1) / per_tile, (n + per_tile - 1) / per_tile);
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  subspace_similarity_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      U, V, S, n, m, d, r, scale, symmetric != 0);
  return cudaGetLastError();
}
