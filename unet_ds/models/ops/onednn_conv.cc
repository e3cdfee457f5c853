// oneDNN convolutions (forward, backward data, backward weights) and linear resampling (forward,
// backward) as XLA FFI custom calls.
//
// Built on first use by unet_ds/models/ops/onednn.py (g++, oneDNN from the onednn-cpu-gomp wheel).
// Layouts are the model's: activations channels-last (NHWC / NDHWC), kernels in flax layout
// (*k, C_in, C_out), float32. Primitives are cached per problem (shapes, strides, padding, threads);
// a call wraps the XLA buffers without copies, reorders the kernel (or its gradient) where the
// primitive wants another layout, and runs the primitive on oneDNN's OpenMP threads.
//
// Batched calls (vmap, e.g. K runs trained together): every operand has the same leading dims
// before its [N, *spatial, C] / [*k, I, O] dims (their product: the members), each member an
// independent convolution of the same problem. Members run side by side, one per thread (a
// small pool; the calling thread is one of them), each primitive on T / threads OpenMP threads:
// K small convolutions keep the cores busy with no barrier between them, where one
// convolution's OpenMP team idles at its barriers (most of all on a loaded machine).

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::format_tag ActivationTag(size_t rank) {
  return rank == 5 ? memory::format_tag::ndhwc : memory::format_tag::nhwc;
}

memory::format_tag KernelTag(size_t rank) {
  return rank == 5 ? memory::format_tag::dhwio : memory::format_tag::hwio;
}

// Channels-last XLA dims [N, *spatial, C] -> oneDNN logical dims [N, C, *spatial].
memory::dims ActivationDims(ffi::Span<const int64_t> d) {
  memory::dims out = {d[0], d[d.size() - 1]};
  for (size_t i = 1; i + 1 < d.size(); ++i) out.push_back(d[i]);
  return out;
}

// Flax kernel dims [*k, I, O] -> oneDNN logical dims [O, I, *k].
memory::dims KernelDims(ffi::Span<const int64_t> d) {
  size_t r = d.size();
  memory::dims out = {d[r - 1], d[r - 2]};
  for (size_t i = 0; i + 2 < r; ++i) out.push_back(d[i]);
  return out;
}

// One buffer of a call: its plain layout in XLA, the primitive's layout, its argument slot.
struct Operand {
  memory::desc user, want;
  int arg;
};

// One primitive with its two inputs and one output, and the scratchpad it needs (user-managed:
// members running concurrently must not share oneDNN's global one).
struct Step {
  dnnl::primitive prim;
  Operand in0, in1, out;
  memory::desc scratchpad;
};

struct Problem {
  Kind kind;
  memory::dims src, wei, dst, strides, lo, hi;
  size_t rank;
  int threads;  // OpenMP threads the primitive is built for (and must run on)
};

std::string Key(const Problem& p) {
  std::string key = std::to_string(p.kind) + '/' + std::to_string(p.threads);
  for (const memory::dims* v : {&p.src, &p.wei, &p.dst, &p.strides, &p.lo, &p.hi}) {
    key += '|';
    for (auto x : *v) key += std::to_string(x) + ',';
  }
  return key;
}

Step Build(const Problem& p) {
  auto& eng = Engine();
  auto any = memory::format_tag::any;
  auto f32 = memory::data_type::f32;
  // Activations stay channels-last (oneDNN's brgemm kernels run "nspc" directly: no reorder of
  // the volume, ~1.4x faster than blocked layouts plus reorders here); kernels are tiny, so
  // they may be reordered to whatever the primitive prefers.
  memory::desc src(p.src, f32, ActivationTag(p.rank)), dst(p.dst, f32, ActivationTag(p.rank));
  memory::desc wei_md(p.wei, f32, any), wei_user(p.wei, f32, KernelTag(p.rank));
  auto alg = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, alg, src, wei_md, dst, p.strides, p.lo,
      p.hi, attr);
  Step s;
  if (p.kind == kForward) {
    s = {dnnl::convolution_forward(fwd), {src, fwd.src_desc(), DNNL_ARG_SRC},
         {wei_user, fwd.weights_desc(), DNNL_ARG_WEIGHTS}, {dst, fwd.dst_desc(), DNNL_ARG_DST},
         fwd.scratchpad_desc()};
  } else if (p.kind == kBackwardData) {
    auto bwd = dnnl::convolution_backward_data::primitive_desc(
        eng, alg, src, wei_md, dst, p.strides, p.lo, p.hi, fwd, attr);
    s = {dnnl::convolution_backward_data(bwd),
         {dst, bwd.diff_dst_desc(), DNNL_ARG_DIFF_DST},
         {wei_user, bwd.weights_desc(), DNNL_ARG_WEIGHTS},
         {src, bwd.diff_src_desc(), DNNL_ARG_DIFF_SRC}, bwd.scratchpad_desc()};
  } else {
    auto bwd = dnnl::convolution_backward_weights::primitive_desc(
        eng, alg, src, wei_md, dst, p.strides, p.lo, p.hi, fwd, attr);
    s = {dnnl::convolution_backward_weights(bwd), {src, bwd.src_desc(), DNNL_ARG_SRC},
         {dst, bwd.diff_dst_desc(), DNNL_ARG_DIFF_DST},
         {wei_user, bwd.diff_weights_desc(), DNNL_ARG_DIFF_WEIGHTS}, bwd.scratchpad_desc()};
  }
  return s;
}

// Runs `step` on the user buffers, reordering where the primitive's layout differs.
void Run(const Step& s, void* in0, void* in1, void* out) {
  auto& eng = Engine();
  dnnl::stream stream(eng);
  auto input = [&](const Operand& op, void* data) {
    memory user(op.user, eng, data);
    if (op.want == op.user) return user;
    memory m(op.want, eng);
    dnnl::reorder(user, m).execute(stream, user, m);
    return m;
  };
  memory a = input(s.in0, in0), b = input(s.in1, in1);
  memory out_user(s.out.user, eng, out);
  memory o = s.out.want == s.out.user ? out_user : memory(s.out.want, eng);
  memory scratch(s.scratchpad, eng);
  s.prim.execute(stream, {{s.in0.arg, a}, {s.in1.arg, b}, {s.out.arg, o},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
  if (!(s.out.want == s.out.user)) dnnl::reorder(o, out_user).execute(stream, o, out_user);
  stream.wait();
}

std::mutex& Mutex() {
  static std::mutex mu;
  return mu;
}

const Step& Cached(const Problem& p) {
  static std::map<std::string, std::unique_ptr<Step>> cache;
  std::string key = Key(p);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, std::make_unique<Step>(Build(p))).first;
  return *it->second;
}

// Sets this thread's OpenMP thread count (oneDNN plans and runs a primitive with the count of the
// thread that creates / executes it) for the scope, then restores it.
class OmpThreads {
 public:
  explicit OmpThreads(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~OmpThreads() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// Runs fn(0..n-1) on `threads` threads: the caller and threads - 1 pool workers, each taking
// the next index until none is left (a member stalled on a busy core delays no other).
class MemberPool {
 public:
  // Returns the first error message of any fn call ('' if none).
  std::string Run(int64_t n, int threads, int inner, const std::function<void(int64_t)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(workers_.size()) < threads - 1) {
        int index = static_cast<int>(workers_.size());
        workers_.emplace_back([this, index] { Loop(index); });
        workers_.back().detach();
      }
      fn_ = &fn;
      helpers_ = threads - 1;
      n_ = n;
      inner_ = inner;
      next_ = 0;
      error_.clear();
      busy_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    {
      OmpThreads scope(inner);
      Work(fn);
    }
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    return error_;
  }

 private:
  void Work(const std::function<void(int64_t)>& fn) {
    for (int64_t i = next_++; i < n_; i = next_++) {
      try {
        fn(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mu_);
        if (error_.empty()) error_ = e.what();
      }
    }
  }

  // Worker `index` joins the calls that ask for more than `index` helpers.
  void Loop(int index) {
    uint64_t seen = 0;
    int inner = -1;
    for (;;) {
      const std::function<void(int64_t)>* fn;
      bool join;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        fn = fn_;
        join = index < helpers_;
        if (join && inner != inner_) omp_set_num_threads(inner = inner_);
      }
      if (join) Work(*fn);
      std::lock_guard<std::mutex> lock(mu_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int inner_ = 1;
  int helpers_ = 0;  // workers that take members in this call
  int busy_ = 0;     // workers yet to finish this call (joined or not)
  uint64_t generation_ = 0;
  std::string error_;
};

MemberPool& Pool() {
  static MemberPool* pool = new MemberPool();  // never destroyed: its threads outlive main
  return *pool;
}

memory::dims ToDims(ffi::Span<const int64_t> v) { return memory::dims(v.begin(), v.end()); }

int64_t Product(ffi::Span<const int64_t> d, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t i = begin; i < end; ++i) n *= d[i];
  return n;
}

ffi::Error Conv(Kind kind, ffi::Span<const int64_t> src_dims, ffi::Span<const int64_t> wei_dims,
                ffi::Span<const int64_t> dst_dims, void* in0, void* in1, void* out,
                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> lo,
                ffi::Span<const int64_t> hi) {
  // One member is [N, *spatial, C] / [*k, I, O]; any dims before those are members (vmap).
  size_t rank = strides.size() + 2;
  if ((rank != 4 && rank != 5) || src_dims.size() < rank || wei_dims.size() != src_dims.size() ||
      dst_dims.size() != src_dims.size() || lo.size() != rank - 2 || hi.size() != rank - 2) {
    return ffi::Error::InvalidArgument("unet_ds onednn conv: inconsistent ranks");
  }
  size_t lead = src_dims.size() - rank;
  for (size_t i = 0; i < lead; ++i) {
    if (wei_dims[i] != src_dims[i] || dst_dims[i] != src_dims[i]) {
      return ffi::Error::InvalidArgument("unet_ds onednn conv: operands' member dims differ");
    }
  }
  int64_t members = Product(src_dims, 0, lead);
  ffi::Span<const int64_t> src(src_dims.begin() + lead, rank), wei(wei_dims.begin() + lead, rank),
      dst(dst_dims.begin() + lead, rank);
  // One member's size (floats) of each of the handler's buffers (in0, in1, out).
  int64_t src_size = Product(src, 0, rank), wei_size = Product(wei, 0, rank),
          dst_size = Product(dst, 0, rank);
  int64_t in0_size = kind == kBackwardData ? dst_size : src_size;
  int64_t in1_size = kind == kBackwardWeights ? dst_size : wei_size;
  int64_t out_size = kind == kForward ? dst_size : kind == kBackwardData ? src_size : wei_size;
  int cores = std::max(1, omp_get_max_threads());
  int threads = static_cast<int>(std::min<int64_t>(members, cores));
  int inner = std::max(1, cores / threads);
  Problem p{kind, ActivationDims(src), KernelDims(wei), ActivationDims(dst),
            ToDims(strides), ToDims(lo), ToDims(hi), rank, inner};
  try {
    std::lock_guard<std::mutex> lock(Mutex());
    const Step* step;
    {
      OmpThreads scope(inner);  // the primitive is planned for the threads it will run on
      step = &Cached(p);
    }
    auto member = [&](int64_t i) {
      Run(*step, static_cast<float*>(in0) + i * in0_size, static_cast<float*>(in1) + i * in1_size,
          static_cast<float*>(out) + i * out_size);
    };
    if (threads == 1) {
      OmpThreads scope(inner);
      for (int64_t i = 0; i < members; ++i) member(i);
    } else {
      std::string error = Pool().Run(members, threads, inner, member);
      if (!error.empty()) return ffi::Error::Internal("unet_ds onednn conv: " + error);
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("unet_ds onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, Ints strides, Ints lo, Ints hi) {
  return Conv(kForward, x.dimensions(), w.dimensions(), y->dimensions(), x.untyped_data(),
              w.untyped_data(), y->untyped_data(), strides, lo, hi);
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, Ints strides, Ints lo,
                        Ints hi) {
  return Conv(kBackwardData, dx->dimensions(), w.dimensions(), dy.dimensions(),
              dy.untyped_data(), w.untyped_data(), dx->untyped_data(), strides, lo, hi);
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, Ints strides, Ints lo,
                           Ints hi) {
  return Conv(kBackwardWeights, x.dimensions(), dw->dimensions(), dy.dimensions(),
              x.untyped_data(), dy.untyped_data(), dw->untyped_data(), strides, lo, hi);
}

// Linear resampling (half-pixel centres, clamped source indices): `jax.image.resize(x, ...,
// 'linear')` when every output size is >= its input size. Activations stay channels-last; the
// primitive reads and writes the XLA buffers in place.

struct Resampling {
  dnnl::primitive prim;
  memory::desc src, dst, scratchpad;
};

Resampling BuildResampling(bool backward, const memory::dims& src_dims,
                           const memory::dims& dst_dims, size_t rank) {
  auto& eng = Engine();
  auto f32 = memory::data_type::f32;
  memory::desc src(src_dims, f32, ActivationTag(rank)), dst(dst_dims, f32, ActivationTag(rank));
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto alg = dnnl::algorithm::resampling_linear;
  auto fwd = dnnl::resampling_forward::primitive_desc(eng, dnnl::prop_kind::forward_training, alg,
                                                      src, dst, attr);
  if (!backward) return {dnnl::resampling_forward(fwd), src, dst, fwd.scratchpad_desc()};
  auto bwd = dnnl::resampling_backward::primitive_desc(eng, alg, src, dst, fwd, attr);
  return {dnnl::resampling_backward(bwd), src, dst, bwd.scratchpad_desc()};
}

const Resampling& CachedResampling(bool backward, const memory::dims& src, const memory::dims& dst,
                                   size_t rank, int threads) {
  static std::map<std::string, std::unique_ptr<Resampling>> cache;
  std::string key = std::to_string(backward) + '/' + std::to_string(threads);
  for (const memory::dims* v : {&src, &dst}) {
    key += '|';
    for (auto x : *v) key += std::to_string(x) + ',';
  }
  auto it = cache.find(key);
  if (it == cache.end()) {
    it = cache.emplace(key, std::make_unique<Resampling>(BuildResampling(backward, src, dst, rank)))
             .first;
  }
  return *it->second;
}

// x [*lead, N, *spatial, C] -> y [*lead, N, *out_spatial, C]. Leading dims (vmap members) are
// folded into N: each member's batch is contiguous, and resampling treats images independently.
// `in` is x (forward) or dy (backward); `out` is y or dx.
ffi::Error Resample(bool backward, ffi::Span<const int64_t> x_dims,
                    ffi::Span<const int64_t> y_dims, int64_t spatial, void* in, void* out) {
  size_t rank = static_cast<size_t>(spatial) + 2;
  if ((rank != 4 && rank != 5) || x_dims.size() < rank || y_dims.size() != x_dims.size()) {
    return ffi::Error::InvalidArgument("unet_ds onednn resampling: inconsistent ranks");
  }
  size_t lead = x_dims.size() - rank;
  for (size_t i = 0; i <= lead; ++i) {
    if (y_dims[i] != x_dims[i]) {
      return ffi::Error::InvalidArgument("unet_ds onednn resampling: batch dims differ");
    }
  }
  if (y_dims[x_dims.size() - 1] != x_dims[x_dims.size() - 1]) {
    return ffi::Error::InvalidArgument("unet_ds onednn resampling: channel counts differ");
  }
  auto dims = [&](ffi::Span<const int64_t> d) {
    memory::dims out = {Product(d, 0, lead + 1), d[d.size() - 1]};
    for (size_t i = lead + 1; i + 1 < d.size(); ++i) out.push_back(d[i]);
    return out;
  };
  int threads = std::max(1, omp_get_max_threads());  // planned and run on all of them
  try {
    std::lock_guard<std::mutex> lock(Mutex());
    const Resampling& r = CachedResampling(backward, dims(x_dims), dims(y_dims), rank, threads);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory src(r.src, eng, backward ? out : in), dst(r.dst, eng, backward ? in : out);
    memory scratch(r.scratchpad, eng);
    if (backward) {
      r.prim.execute(stream, {{DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_DIFF_SRC, src},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      r.prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("unet_ds onednn resampling: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ResampleForward(F32 x, ffi::ResultBuffer<ffi::F32> y, int64_t spatial) {
  return Resample(false, x.dimensions(), y->dimensions(), spatial, x.untyped_data(),
                  y->untyped_data());
}

ffi::Error ResampleBackward(F32 dy, ffi::ResultBuffer<ffi::F32> dx, int64_t spatial) {
  return Resample(true, dx->dimensions(), dy.dimensions(), spatial, dy.untyped_data(),
                  dx->untyped_data());
}

}  // namespace

#define UNET_DS_RESAMPLE_HANDLER(symbol, impl)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                               \
                                ffi::Ffi::Bind()                            \
                                    .Arg<F32>()                             \
                                    .Ret<F32>()                             \
                                    .Attr<int64_t>("spatial_dims"));

UNET_DS_RESAMPLE_HANDLER(UnetDsResampleForward, ResampleForward)
UNET_DS_RESAMPLE_HANDLER(UnetDsResampleBackward, ResampleBackward)

#define UNET_DS_CONV_HANDLER(symbol, impl)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                               \
                                ffi::Ffi::Bind()                            \
                                    .Arg<F32>()                             \
                                    .Arg<F32>()                             \
                                    .Ret<F32>()                             \
                                    .Attr<Ints>("strides")                  \
                                    .Attr<Ints>("pad_lo")                   \
                                    .Attr<Ints>("pad_hi"));

UNET_DS_CONV_HANDLER(UnetDsConvForward, Forward)
UNET_DS_CONV_HANDLER(UnetDsConvBackwardData, BackwardData)
UNET_DS_CONV_HANDLER(UnetDsConvBackwardWeights, BackwardWeights)
