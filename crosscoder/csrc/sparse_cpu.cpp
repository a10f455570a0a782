// CPU kernels for the k-sparse training step: each replaces several full passes of PyTorch ops
// over a [B, L] or [L, D] tensor by one. See crosscoder/native.py for why and what it costs.
//
// Every function takes contiguous CPU tensors; the Python wrapper checks and converts.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace {

// Pieces of work for at::parallel_for: more pieces than threads, so uneven rows balance out.
int64_t n_pieces(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, 8 * at::get_num_threads()));
}

// A BatchTopK/TopK score: clamp at 0, then multiply, in the tensor's dtype: the float operations of
// sparsity.scores, so comparisons agree bit for bit with the PyTorch path (NaN stays NaN).
template <typename scalar_t>
inline scalar_t score(scalar_t x, scalar_t w) {
  return static_cast<scalar_t>((x < scalar_t(0) ? scalar_t(0) : x) * w);
}

// The entries each piece of consecutive rows collected, concatenated in piece order, so row-major
// overall: (flat index int64 [M], score [M]).
template <typename scalar_t>
std::vector<torch::Tensor> concatenated(const std::vector<std::vector<int64_t>>& idx,
                                        const std::vector<std::vector<scalar_t>>& val,
                                        const torch::TensorOptions& options) {
  const int64_t pieces = static_cast<int64_t>(idx.size());
  int64_t total = 0;
  std::vector<int64_t> start(pieces);
  for (int64_t i = 0; i < pieces; ++i) {
    start[i] = total;
    total += static_cast<int64_t>(idx[i].size());
  }
  auto flat = torch::empty({total}, options.dtype(torch::kInt64));
  auto scores = torch::empty({total}, options);
  int64_t* fp = flat.data_ptr<int64_t>();
  scalar_t* sp = scores.data_ptr<scalar_t>();
  at::parallel_for(0, pieces, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      std::copy(idx[i].begin(), idx[i].end(), fp + start[i]);
      std::copy(val[i].begin(), val[i].end(), sp + start[i]);
    }
  });
  return {flat, scores};
}

// Counting sort of the entries e0 .. e1 by latent (stable): the entries n of latent l are
// order[offsets[l] .. offsets[l + 1]). One pass to count, one to place; O(N + L), no comparison sort.
void sort_by_latent(const int64_t* lp, int64_t e0, int64_t e1, int64_t L, std::vector<int64_t>& offsets,
                    std::vector<int64_t>& order) {
  offsets.assign(L + 1, 0);
  order.resize(e1 - e0);
  for (int64_t n = e0; n < e1; ++n) {
    TORCH_CHECK(lp[n] >= 0 && lp[n] < L, "latent index out of range");
    ++offsets[lp[n] + 1];
  }
  for (int64_t l = 0; l < L; ++l) offsets[l + 1] += offsets[l];
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t n = e0; n < e1; ++n) order[fill[lp[n]]++] = n;
}

void sort_by_latent(const torch::Tensor& latent, int64_t L, std::vector<int64_t>& offsets,
                    std::vector<int64_t>& order) {
  sort_by_latent(latent.data_ptr<int64_t>(), 0, latent.numel(), L, offsets, order);
}

// Write 16 values (column j of a [16, D] block, stride D) as one 64-byte line of float, streamed
// past the cache (a partial write of a line not in cache reads it from memory first; a whole
// streamed line does not). Only float, only when aligned: other types return false and are written
// the plain way (measured: the encoder gradient's [D, L] write 4-9% faster).
template <typename S, typename A>
inline bool stream_line(S*, const A*, int64_t) { return false; }

#if defined(__SSE2__)
inline bool stream_line(float* dst, const float* column, int64_t stride) {
  if (reinterpret_cast<uintptr_t>(dst) % 64 != 0) return false;
  alignas(64) float line[16];
  for (int l = 0; l < 16; ++l) line[l] = column[l * stride];
  for (int q = 0; q < 16; q += 4) _mm_stream_ps(dst + q, _mm_load_ps(line + q));
  return true;
}
inline void stream_fence() { _mm_sfence(); }
#else
inline void stream_fence() {}
#endif

}  // namespace

// Entries of relu(pre) * w that are >= thr[r] (their row's threshold) and > 0, in row-major order
// (as nonzero returns them). pre [R, L], w [L], thr [R] (one dtype). Returns (flat index int64
// [M], score [M]). Serves BatchTopK (one positive threshold for every row: the hint) and TopK
// (each row's k-th largest, which may be 0 when a row has fewer than k positive scores).
std::vector<torch::Tensor> scores_at_least(torch::Tensor pre, torch::Tensor w, torch::Tensor thr) {
  TORCH_CHECK(pre.dim() == 2 && w.dim() == 1 && thr.dim() == 1 && pre.size(1) == w.size(0) &&
              thr.size(0) == pre.size(0), "pre [R, L], w [L], thr [R] expected");
  TORCH_CHECK(pre.scalar_type() == w.scalar_type() && pre.scalar_type() == thr.scalar_type(),
              "pre, w and thr must have one dtype");
  const int64_t R = pre.size(0), L = pre.size(1);
  const int64_t pieces = n_pieces(R);
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pre.scalar_type(), "scores_at_least", [&] {
    const scalar_t* p = pre.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* tp = thr.data_ptr<scalar_t>();
    std::vector<std::vector<int64_t>> idx(pieces);
    std::vector<std::vector<scalar_t>> val(pieces);
    at::parallel_for(0, pieces, 1, [&](int64_t lo, int64_t hi) {
      constexpr int64_t W = 64;  // scores per block: computed and tested with vector code
      scalar_t s[W];
      for (int64_t piece = lo; piece < hi; ++piece) {
        const int64_t r0 = R * piece / pieces, r1 = R * (piece + 1) / pieces;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = p + r * L;
          const scalar_t t = tp[r];
          for (int64_t l0 = 0; l0 < L; l0 += W) {
            const int64_t n = std::min(W, L - l0);
            int hits = 0;
            for (int64_t j = 0; j < n; ++j) {
              s[j] = score(row[l0 + j], wp[l0 + j]);
              hits += (s[j] >= t) & (s[j] > scalar_t(0));  // NaN passes neither, as in PyTorch
            }
            if (!hits) continue;
            for (int64_t j = 0; j < n; ++j) {
              if (s[j] >= t && s[j] > scalar_t(0)) {
                idx[piece].push_back(r * L + l0 + j);
                val[piece].push_back(s[j]);
              }
            }
          }
        }
      }
    });
    out = concatenated(idx, val, pre.options());
  });
  return out;
}

// One row's k largest scores of relu(pre) * w (k <= L), as RowTopK::find leaves them: the row is
// scored into a buffer that stays in cache, each block of W scores with its maximum in the same
// pass (vector code), and only the blocks whose maximum reaches a bound are searched (nth_element):
// one read of pre, instead of a scored copy, a topk over it and its bookkeeping. NaN scores count
// as -inf.
template <typename scalar_t>
struct RowTopK {
  static constexpr int64_t W = 64;
  const int64_t L, k, blocks;
  std::vector<scalar_t> buf, block_max, bm, cand;

  RowTopK(int64_t L_, int64_t k_) : L(L_), k(k_), blocks((L_ + W - 1) / W), buf(L_), block_max(blocks) {
    cand.reserve(4 * k + W);
  }

  // Scores the row; leaves its k largest in cand[0, k) and returns the k-th largest.
  scalar_t find(const scalar_t* row, const scalar_t* wp) {
    const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t l0 = b * W, n = std::min(W, L - l0);
      scalar_t* out_b = buf.data() + l0;
      scalar_t part[16];  // 16 running maxima (one per lane), then their maximum
      std::fill(part, part + 16, neg_inf);
      int64_t j = 0;
      for (; j + 16 <= n; j += 16)
        for (int u = 0; u < 16; ++u) {
          scalar_t s = score(row[l0 + j + u], wp[l0 + j + u]);
          s = s == s ? s : neg_inf;
          out_b[j + u] = s;
          part[u] = s > part[u] ? s : part[u];
        }
      for (; j < n; ++j) {
        const scalar_t s = score(row[l0 + j], wp[l0 + j]);
        out_b[j] = s == s ? s : neg_inf;
        part[0] = out_b[j] > part[0] ? out_b[j] : part[0];
      }
      scalar_t m = part[0];
      for (int u = 1; u < 16; ++u) m = part[u] > m ? part[u] : m;
      block_max[b] = m;
    }
    // the k-th largest value is at least the k-th largest block maximum (those are k values), so
    // only the scores at or above that bound can be among the k largest
    scalar_t bound = neg_inf;
    if (blocks >= k) {
      bm.assign(block_max.begin(), block_max.end());
      std::nth_element(bm.begin(), bm.begin() + (k - 1), bm.end(), std::greater<scalar_t>());
      bound = bm[k - 1];
    }
    cand.clear();
    for (int64_t b = 0; b < blocks; ++b) {
      if (block_max[b] < bound) continue;
      const int64_t l0 = b * W, n = std::min(W, L - l0);
      for (int64_t j = 0; j < n; ++j)
        if (buf[l0 + j] >= bound) cand.push_back(buf[l0 + j]);
    }
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<scalar_t>());
    return cand[k - 1];
  }

  // After find: the columns whose score is >= kth and > 0, ascending, with their scores.
  void at_least(scalar_t kth, int64_t offset, std::vector<int64_t>& idx, std::vector<scalar_t>& val) const {
    for (int64_t b = 0; b < blocks; ++b) {
      if (block_max[b] < kth || !(block_max[b] > scalar_t(0))) continue;
      const int64_t l0 = b * W, n = std::min(W, L - l0);
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t s = buf[l0 + j];
        if (s >= kth && s > scalar_t(0)) {
          idx.push_back(offset + l0 + j);
          val.push_back(s);
        }
      }
    }
  }
};

// Per row of relu(pre) * w [R, L]: its k largest scores, unordered [R, k] (k <= L).
torch::Tensor row_topk_scores(torch::Tensor pre, torch::Tensor w, int64_t k) {
  TORCH_CHECK(pre.dim() == 2 && w.dim() == 1 && pre.size(1) == w.size(0), "pre [R, L] and w [L] expected");
  TORCH_CHECK(pre.scalar_type() == w.scalar_type(), "pre and w must have one dtype");
  const int64_t R = pre.size(0), L = pre.size(1);
  TORCH_CHECK(k >= 1 && k <= L, "need 1 <= k <= L");
  auto out = torch::empty({R, k}, pre.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pre.scalar_type(), "row_topk_scores", [&] {
    const scalar_t* p = pre.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 8, [&](int64_t lo, int64_t hi) {
      RowTopK<scalar_t> top(L, k);
      for (int64_t r = lo; r < hi; ++r) {
        top.find(p + r * L, wp);
        std::copy(top.cand.begin(), top.cand.begin() + k, op + r * k);
      }
    });
  });
  return out;
}

// Per row of relu(pre) * w [R, L]: its k largest scores [R, k] (unordered), and the entries that
// reach the row's k-th largest and are > 0 (flat index int64 [M], score [M], row-major): what
// row_topk_scores then scores_at_least with each row's k-th largest return, in one read of pre.
// Over latent shards the k-th largest over all shards is at least this shard's, so the entries
// that reach it are among these (sparsity.topk_entries keeps those).
std::vector<torch::Tensor> row_topk_entries(torch::Tensor pre, torch::Tensor w, int64_t k) {
  TORCH_CHECK(pre.dim() == 2 && w.dim() == 1 && pre.size(1) == w.size(0), "pre [R, L] and w [L] expected");
  TORCH_CHECK(pre.scalar_type() == w.scalar_type(), "pre and w must have one dtype");
  const int64_t R = pre.size(0), L = pre.size(1);
  TORCH_CHECK(k >= 1 && k <= L, "need 1 <= k <= L");
  const int64_t pieces = n_pieces(R);
  auto top_k = torch::empty({R, k}, pre.options());
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pre.scalar_type(), "row_topk_entries", [&] {
    const scalar_t* p = pre.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = top_k.data_ptr<scalar_t>();
    std::vector<std::vector<int64_t>> idx(pieces);
    std::vector<std::vector<scalar_t>> val(pieces);
    at::parallel_for(0, pieces, 1, [&](int64_t lo, int64_t hi) {
      RowTopK<scalar_t> top(L, k);
      for (int64_t piece = lo; piece < hi; ++piece) {
        const int64_t r0 = R * piece / pieces, r1 = R * (piece + 1) / pieces;
        idx[piece].reserve((r1 - r0) * k);
        val[piece].reserve((r1 - r0) * k);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t kth = top.find(p + r * L, wp);
          std::copy(top.cand.begin(), top.cand.begin() + k, op + r * k);
          top.at_least(kth, r * L, idx[piece], val[piece]);
        }
      }
    });
    out = concatenated(idx, val, pre.options());
    out.insert(out.begin(), top_k);
  });
  return out;
}

// How many entries of pre [R, L] exceed max(thr[l], 0): BatchTopK's inference rule
// (sparsity.threshold_mask) counted in one read of pre, without its [R, L] mask (a fresh 2048 x
// 65536 bool tensor and a comparison pass cost 5-10x the read). A NaN threshold or entry counts as
// not firing, as in PyTorch.
int64_t count_above(torch::Tensor pre, torch::Tensor thr) {
  TORCH_CHECK(pre.dim() == 2 && thr.dim() == 1 && pre.size(1) == thr.size(0), "pre [R, L] and thr [L] expected");
  TORCH_CHECK(pre.scalar_type() == thr.scalar_type(), "pre and thr must have one dtype");
  const int64_t R = pre.size(0), L = pre.size(1);
  const int64_t pieces = n_pieces(R);
  std::vector<int64_t> counts(pieces, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pre.scalar_type(), "count_above", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pre.data_ptr<scalar_t>();
    const scalar_t* tp = thr.data_ptr<scalar_t>();
    std::vector<op_t> floor(L);
    for (int64_t l = 0; l < L; ++l) {
      const op_t t = static_cast<op_t>(tp[l]);
      floor[l] = t < op_t(0) ? op_t(0) : t;  // clamp_min(0), NaN kept
    }
    at::parallel_for(0, pieces, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t piece = lo; piece < hi; ++piece) {
        const int64_t r0 = R * piece / pieces, r1 = R * (piece + 1) / pieces;
        int64_t n = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = p + r * L;
          int32_t in_row = 0;
          for (int64_t l = 0; l < L; ++l) in_row += static_cast<op_t>(row[l]) > floor[l];
          n += in_row;
        }
        counts[piece] = n;
      }
    });
  });
  int64_t total = 0;
  for (int64_t n : counts) total += n;
  return total;
}

// Per latent l < L: column l of the [D, L] result = sum over entries n with latent[n] == l of
// coef[n] * src[token[n]], accumulated in float: the encoder gradient in W_enc's own layout. Sums
// are built for blocks of 16 latents, then written so each transposed write is a cache line.
// Latents without entries get zeros, in the same pass. src [B, D]; token, latent int64 [N];
// coef [N] (src's dtype).
torch::Tensor latent_sums(torch::Tensor src, torch::Tensor token, torch::Tensor latent, torch::Tensor coef,
                          int64_t L, c10::optional<torch::Tensor> out_opt) {
  TORCH_CHECK(src.dim() == 2, "src [B, D] expected");
  TORCH_CHECK(coef.scalar_type() == src.scalar_type(), "coef and src must have one dtype");
  const int64_t D = src.size(1);
  const int64_t* tp = token.data_ptr<int64_t>();
  std::vector<int64_t> offsets, order;
  sort_by_latent(latent, L, offsets, order);
  torch::Tensor out = out_opt.has_value() ? *out_opt : torch::empty({D, L}, src.options());
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == D && out.size(1) == L &&
              out.scalar_type() == src.scalar_type(), "out must be a contiguous [D, L] tensor of src's dtype");
  constexpr int64_t BLOCK = 16;  // latents per block: one 64-byte line of float per transposed row
  const int64_t blocks = (L + BLOCK - 1) / BLOCK;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "latent_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* cp = coef.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 16, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(BLOCK * D);
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t l0 = blk * BLOCK, l1 = std::min(L, l0 + BLOCK);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t l = l0; l < l1; ++l) {
          acc_t* __restrict__ row = acc.data() + (l - l0) * D;
          for (int64_t e = offsets[l]; e < offsets[l + 1]; ++e) {
            const int64_t n = order[e];
            const acc_t c = static_cast<acc_t>(cp[n]);
            const scalar_t* __restrict__ x = sp + tp[n] * D;
            for (int64_t j = 0; j < D; ++j) row[j] += c * static_cast<acc_t>(x[j]);
          }
        }
        for (int64_t j = 0; j < D; ++j) {
          scalar_t* dst = op + j * L;
          int64_t l = l0;
          for (; l + 16 <= l1 && stream_line(dst + l, acc.data() + (l - l0) * D + j, D); l += 16) {}
          for (; l < l1; ++l) dst[l] = static_cast<scalar_t>(acc[(l - l0) * D + j]);
        }
      }
      stream_fence();  // the streamed stores are visible before the result is used
    });
  });
  return out;
}

// The sparse decoder, latent by latent: out[r] = sum over entries n with row[n] == r of
// value[n] * W[latent[n]], rows ascending. The entries are cut into pieces of consecutive rows
// (about 2 MiB of output each, so a piece's rows stay in cache while it runs); within a piece they
// are visited latent by latent, so each W row is read once per piece instead of once per entry.
// Measured at L = 64k, D = 1024, 655k entries (the main code and AuxK's): 0.11 s against 0.17 s
// for embedding_bag's row-by-row gather. float and double only: a bf16 output summed in place
// would round at every addition (bf16 stays with embedding_bag, which sums in float per row).
torch::Tensor decode_forward(torch::Tensor row, torch::Tensor latent, torch::Tensor value, torch::Tensor W,
                             int64_t R) {
  TORCH_CHECK(W.dim() == 2 && value.scalar_type() == W.scalar_type(), "W [L, D] and value of W's dtype expected");
  const int64_t N = row.numel(), L = W.size(0), D = W.size(1);
  TORCH_CHECK(latent.numel() == N && value.numel() == N, "row, latent and value must have one length");
  const int64_t* rp = row.data_ptr<int64_t>();
  const int64_t* lp = latent.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)  // latents are checked by the sort
    TORCH_CHECK(rp[n] >= 0 && rp[n] < R && (n == 0 || rp[n] >= rp[n - 1]), "rows must be ascending and < R");
  auto out = torch::empty({R, D}, W.options());
  const int64_t bytes = R * D * static_cast<int64_t>(W.element_size());
  const int64_t P = std::max<int64_t>(at::get_num_threads(), std::min<int64_t>(64, bytes >> 21));
  // piece p holds entries cut[p] .. cut[p + 1] and rows first[p] .. first[p + 1]
  std::vector<int64_t> cut(P + 1, N), first(P + 1, R);
  cut[0] = 0;
  first[0] = 0;
  for (int64_t p = 1; p < P; ++p) {
    int64_t c = std::max(cut[p - 1], N * p / P);
    while (c > 0 && c < N && rp[c] == rp[c - 1]) ++c;
    cut[p] = c;
    first[p] = c < N ? rp[c] : R;
  }
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "decode_forward", [&] {
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
      std::vector<int64_t> offsets, order;
      for (int64_t p = lo; p < hi; ++p) {
        std::fill(op + first[p] * D, op + first[p + 1] * D, scalar_t(0));
        sort_by_latent(lp, cut[p], cut[p + 1], L, offsets, order);
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t* __restrict__ w = wp + l * D;
          for (int64_t e = offsets[l]; e < offsets[l + 1]; ++e) {
            const int64_t n = order[e];
            scalar_t* __restrict__ o = op + rp[n] * D;
            const scalar_t v = vp[n];
            for (int64_t j = 0; j < D; ++j) o[j] += v * w[j];
          }
        }
      }
    });
  });
  return out;
}

// The sparse decoder's backward, latent by latent: for the decoder out[r] = sum_n value[n] * W[latent[n]]
// over entries with row[n] == r, given grad [R, D]:
//   grad_value[n] = dot(grad[row[n]], W[latent[n]])          (if need_value)
//   grad_W[l]     = sum over entries of l of value[n] * grad[row[n]], zeros elsewhere (if grad_W given)
// Each latent's W row is read once for all its entries (entry by entry, as a gather does, it was
// read once per entry: AuxK's entries concentrate on the dead latents, ~64 per row per step), and
// the gradient row is written once, zeros included, so no separate zero fill, sort or transpose.
// grad [R, D], W [L, D], value [N], grad_W [L, D] (W's dtype); sums in float (double for float64).
torch::Tensor decode_backward(torch::Tensor grad, torch::Tensor row, torch::Tensor latent, torch::Tensor value,
                              torch::Tensor W, bool need_value, c10::optional<torch::Tensor> grad_W_opt) {
  TORCH_CHECK(grad.dim() == 2 && W.dim() == 2 && grad.size(1) == W.size(1), "grad [R, D], W [L, D] expected");
  TORCH_CHECK(grad.scalar_type() == W.scalar_type() && value.scalar_type() == W.scalar_type(),
              "grad, value and W must have one dtype");
  const int64_t N = row.numel(), D = W.size(1), L = W.size(0);
  const bool need_W = grad_W_opt.has_value();
  if (need_W) {
    const auto& gW = *grad_W_opt;
    TORCH_CHECK(gW.is_contiguous() && gW.sizes() == W.sizes() && gW.scalar_type() == W.scalar_type(),
                "grad_W must be a contiguous tensor of W's shape and dtype");
  }
  std::vector<int64_t> offsets, order;
  sort_by_latent(latent, L, offsets, order);
  auto grad_value = torch::empty({need_value ? N : 0}, W.options());
  const int64_t* rp = row.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "decode_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* gvp = need_value ? grad_value.data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = need_W ? grad_W_opt->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, L, 64, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(D), w(D);
      for (int64_t l = lo; l < hi; ++l) {
        const int64_t e0 = offsets[l], e1 = offsets[l + 1];
        scalar_t* dst = need_W ? gwp + l * D : nullptr;
        if (e0 == e1) {
          if (need_W) std::fill(dst, dst + D, scalar_t(0));
          continue;
        }
        const scalar_t* wl = wp + l * D;
        acc_t* __restrict__ a = acc.data();
        acc_t* __restrict__ wa = w.data();
        for (int64_t j = 0; j < D; ++j) wa[j] = static_cast<acc_t>(wl[j]);
        std::fill(a, a + D, acc_t(0));
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t n = order[e];
          const scalar_t* __restrict__ g = gp + rp[n] * D;
          const acc_t v = static_cast<acc_t>(vp[n]);
          acc_t part[16] = {};
          int64_t j = 0;
          for (; j + 16 <= D; j += 16)
            for (int u = 0; u < 16; ++u) {
              const acc_t gj = static_cast<acc_t>(g[j + u]);
              part[u] += gj * wa[j + u];
              a[j + u] += v * gj;
            }
          acc_t s = 0;
          for (; j < D; ++j) {
            const acc_t gj = static_cast<acc_t>(g[j]);
            s += gj * wa[j];
            a[j] += v * gj;
          }
          for (int u = 0; u < 16; ++u) s += part[u];
          if (need_value) gvp[n] = static_cast<scalar_t>(s);
        }
        if (need_W)
          for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return grad_value;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores_at_least", &scores_at_least, "entries of relu(pre)*w >= thr[row] and > 0 (flat index, score)");
  m.def("row_topk_scores", &row_topk_scores, "per row, the k largest of relu(pre)*w [R, k], unordered");
  m.def("row_topk_entries", &row_topk_entries,
        "per row, the k largest of relu(pre)*w [R, k], and the entries >= the row's k-th and > 0 (flat index, score)");
  m.def("count_above", &count_above, "how many entries of pre [R, L] exceed max(thr[l], 0)");
  m.def("latent_sums", &latent_sums, "per-latent sums of coef * src[token], as columns of [D, L]",
        py::arg("src"), py::arg("token"), py::arg("latent"), py::arg("coef"), py::arg("L"), py::arg("out") = py::none());
  m.def("decode_forward", &decode_forward, "sparse decoder, latent by latent within pieces of rows (float, double)");
  m.def("decode_backward", &decode_backward, "sparse decoder backward, latent by latent: grad of values and of W");
}
