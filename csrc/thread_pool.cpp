#include "thread_pool.h"

namespace lmc {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mutex_);
    stopping_ = true;
  }
  start_cv_.notify_all();
  for (auto& w : workers_) w.join();
}

namespace {
int64_t share_begin(int64_t n, int share, int shares) { return n * share / shares; }
}  // namespace

void ThreadPool::parallel_for(int64_t n, const RangeFn& fn) {
  std::unique_lock<std::mutex> run(run_mutex_, std::try_to_lock);
  if (!run.owns_lock() || workers_.empty() || n < 2) {
    fn(0, n);
    return;
  }
  const int shares = threads();
  {
    std::lock_guard<std::mutex> lk(mutex_);
    job_ = &fn;
    job_size_ = n;
    pending_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  start_cv_.notify_all();
  fn(0, share_begin(n, 1, shares));
  std::unique_lock<std::mutex> lk(mutex_);
  done_cv_.wait(lk, [this] { return pending_ == 0; });
  job_ = nullptr;
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    const RangeFn* job;
    int64_t n;
    {
      std::unique_lock<std::mutex> lk(mutex_);
      start_cv_.wait(lk, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      job = job_;
      n = job_size_;
    }
    const int shares = threads();
    (*job)(share_begin(n, index, shares), share_begin(n, index + 1, shares));
    {
      std::lock_guard<std::mutex> lk(mutex_);
      --pending_;
    }
    done_cv_.notify_one();
  }
}

}  // namespace lmc
