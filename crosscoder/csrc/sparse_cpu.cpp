// CPU kernels for the k-sparse training step: each replaces several full passes of PyTorch ops
// over a [B, L] or [L, D] tensor by one. See crosscoder/native.py for why and what it costs.
//
// Every function takes contiguous CPU tensors; the Python wrapper checks and converts.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
    int64_t total = 0;
    std::vector<int64_t> start(pieces);
    for (int64_t i = 0; i < pieces; ++i) {
      start[i] = total;
      total += static_cast<int64_t>(idx[i].size());
    }
    auto flat = torch::empty({total}, pre.options().dtype(torch::kInt64));
    auto scores = torch::empty({total}, pre.options());
    int64_t* fp = flat.data_ptr<int64_t>();
    scalar_t* sp = scores.data_ptr<scalar_t>();
    at::parallel_for(0, pieces, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        std::copy(idx[i].begin(), idx[i].end(), fp + start[i]);
        std::copy(val[i].begin(), val[i].end(), sp + start[i]);
      }
    });
    out = {flat, scores};
  });
  return out;
}

// Per row of relu(pre) * w [R, L]: its k largest scores, unordered [R, k] (k <= L). Each row is
// scored into a buffer that stays in cache and partially sorted there (nth_element): one read of
// pre, instead of a scored copy, a topk over it and its bookkeeping. NaN scores count as -inf.
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
    constexpr int64_t W = 64;
    const int64_t blocks = (L + W - 1) / W;
    at::parallel_for(0, R, 8, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> buf(L), block_max(blocks), cand;
      cand.reserve(4 * k + W);
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = p + r * L;
        // scores and each block's maximum (vector code)
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t l0 = b * W, n = std::min(W, L - l0);
          scalar_t* out_b = buf.data() + l0;
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t s = score(row[l0 + j], wp[l0 + j]);
            out_b[j] = s == s ? s : -std::numeric_limits<scalar_t>::infinity();
          }
          // 16 running maxima (one per lane), then their maximum
          scalar_t part[16];
          std::fill(part, part + 16, -std::numeric_limits<scalar_t>::infinity());
          int64_t j = 0;
          for (; j + 16 <= n; j += 16)
            for (int u = 0; u < 16; ++u) part[u] = out_b[j + u] > part[u] ? out_b[j + u] : part[u];
          for (; j < n; ++j) part[0] = out_b[j] > part[0] ? out_b[j] : part[0];
          scalar_t m = part[0];
          for (int u = 1; u < 16; ++u) m = part[u] > m ? part[u] : m;
          block_max[b] = m;
        }
        // the k-th largest value is at least the k-th largest block maximum (those are k values),
        // so only the scores at or above that bound can be among the k largest
        scalar_t bound = -std::numeric_limits<scalar_t>::infinity();
        if (blocks >= k) {
          std::vector<scalar_t> bm(block_max);
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
        std::copy(cand.begin(), cand.begin() + k, op + r * k);
      }
    });
  });
  return out;
}

// out[n] = dot(a[a_index[n]], b[b_index[n]]), accumulated in float (double for float64).
// a [Na, D], b [Nb, D] one dtype; indices int64 [N].
torch::Tensor gathered_dot(torch::Tensor a, torch::Tensor a_index, torch::Tensor b, torch::Tensor b_index) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "a [Na, D], b [Nb, D] expected");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must have one dtype");
  const int64_t N = a_index.numel(), D = a.size(1);
  auto out = torch::empty({N}, a.options());
  const int64_t* ai = a_index.data_ptr<int64_t>();
  const int64_t* bi = b_index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "gathered_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const scalar_t* x = ap + ai[n] * D;
        const scalar_t* y = bp + bi[n] * D;
        // 16 partial sums: a reduction order the compiler may vectorize (a single running sum
        // it may not reorder)
        acc_t part[16] = {};
        int64_t j = 0;
        for (; j + 16 <= D; j += 16)
          for (int u = 0; u < 16; ++u) part[u] += static_cast<acc_t>(x[j + u]) * static_cast<acc_t>(y[j + u]);
        acc_t s = 0;
        for (; j < D; ++j) s += static_cast<acc_t>(x[j]) * static_cast<acc_t>(y[j]);
        for (int u = 0; u < 16; ++u) s += part[u];
        op[n] = static_cast<scalar_t>(s);
      }
    });
  });
  return out;
}

// Per latent l < L: column l of the [D, L] result = sum over entries n with latent[n] == l of
// coef[n] * src[token[n]], accumulated in float: the encoder gradient in W_enc's own layout. Sums
// are built for blocks of 16 latents, then written so each transposed write is a cache line.
// Latents without entries get zeros, in the same pass. src [B, D]; token, latent int64 [N];
// coef [N] (src's dtype).
torch::Tensor latent_sums(torch::Tensor src, torch::Tensor token, torch::Tensor latent, torch::Tensor coef,
                          int64_t L) {
  TORCH_CHECK(src.dim() == 2, "src [B, D] expected");
  TORCH_CHECK(coef.scalar_type() == src.scalar_type(), "coef and src must have one dtype");
  const int64_t N = token.numel(), D = src.size(1);
  const int64_t* tp = token.data_ptr<int64_t>();
  const int64_t* lp = latent.data_ptr<int64_t>();
  // counting sort of the entries by latent: offsets [L + 1], order [N] (stable)
  std::vector<int64_t> offsets(L + 1, 0), order(N);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(lp[n] >= 0 && lp[n] < L, "latent index out of range");
    ++offsets[lp[n] + 1];
  }
  for (int64_t l = 0; l < L; ++l) offsets[l + 1] += offsets[l];
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < N; ++n) order[fill[lp[n]]++] = n;
  }
  auto out = torch::empty({D, L}, src.options());
  constexpr int64_t BLOCK = 16;  // latents per block: 64 bytes of float per transposed row
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
          for (int64_t l = l0; l < l1; ++l) dst[l] = static_cast<scalar_t>(acc[(l - l0) * D + j]);
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores_at_least", &scores_at_least, "entries of relu(pre)*w >= thr[row] and > 0 (flat index, score)");
  m.def("row_topk_scores", &row_topk_scores, "per row, the k largest of relu(pre)*w [R, k], unordered");
  m.def("gathered_dot", &gathered_dot, "out[n] = dot(a[ai[n]], b[bi[n]])");
  m.def("latent_sums", &latent_sums, "per-latent sums of coef * src[token], as columns of [D, L]");
}
