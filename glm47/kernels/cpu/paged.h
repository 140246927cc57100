// Reading the paged KV cache: where a sequence's key / value rows live, and the input checks.
#pragma once

#include "common.h"

namespace glm47::cpu {

// Where key / value s of one sequence and KV head g lives in a paged cache (num_blocks, bs, Hkv, D): block
// table[s / bs], slot s % bs. A shift and a mask when bs is a power of two (the engine's 16): a division per key
// would cost more than the key's dot products.
struct PagedRows {
  const int64_t* table;
  int64_t bs, Hkv, D, g;
  int shift;  // log2(bs), or -1

  PagedRows(const int64_t* table, int64_t bs, int64_t Hkv, int64_t D, int64_t g)
      : table(table), bs(bs), Hkv(Hkv), D(D), g(g), shift((bs & (bs - 1)) == 0 ? __builtin_ctzll(bs) : -1) {}

  const bf16* operator()(const bf16* cache, int64_t s) const {
    const int64_t slot = shift >= 0 ? (table[s >> shift] << shift) + (s & (bs - 1)) : table[s / bs] * bs + s % bs;
    return cache + (slot * Hkv + g) * D;
  }
};

// q (rows, H, D) and the paged caches (num_blocks, block_size, Hkv, D): bf16, contiguous, D a multiple of 32, and
// H a multiple of Hkv.
inline void check_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_bf16_matrix(q, "q", 3);
  check_bf16_matrix(k_cache, "k_cache", 4);
  check_bf16_matrix(v_cache, "v_cache", 4);
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q and the caches must be contiguous");
  const int64_t H = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == D && D % 32 == 0 && H % Hkv == 0,
              "q ", q.sizes(), " and caches ", k_cache.sizes(), " do not fit (head_dim must be a multiple of 32)");
}

// Keys ahead whose rows attention prefetches: paged rows are short runs (D values of one KV head), which the
// hardware prefetchers do not follow far enough to keep the memory busy.
constexpr int64_t KEYS_AHEAD = 16;

inline void prefetch_row(const bf16* row, int64_t D) {
  for (int64_t off = 0; off < D * 2; off += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + off, _MM_HINT_T0);
}

}  // namespace glm47::cpu
