#include "serve/queue.hpp"

#include <algorithm>

#include "serve/api_error.hpp"

namespace moelab::serve {

namespace {
ApiError shutting_down_error() {
  return ApiError(503, "the server is shutting down", "server_error", "", "shutting_down");
}
}  // namespace

std::unique_ptr<EngineQueue::Ticket> EngineQueue::try_enter() {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancel_.load()) throw shutting_down_error();
  // The engine's own request does not count: max_waiting wait behind it.
  if (waiting_.size() + (running_ != 0 ? 1 : 0) > max_waiting_) return nullptr;
  const uint64_t id = next_id_++;
  waiting_.push_back(id);
  return std::unique_ptr<Ticket>(new Ticket(*this, id));
}

void EngineQueue::Ticket::wait_turn() {
  std::unique_lock<std::mutex> lock(q_.mu_);
  q_.cv_.wait(lock, [&] { return q_.cancel_.load() || (q_.running_ == 0 && q_.waiting_.front() == id_); });
  if (q_.cancel_.load()) throw shutting_down_error();
  q_.waiting_.pop_front();
  q_.running_ = id_;
}

EngineQueue::Ticket::~Ticket() {
  {
    std::lock_guard<std::mutex> lock(q_.mu_);
    if (q_.running_ == id_)
      q_.running_ = 0;
    else
      q_.waiting_.erase(std::remove(q_.waiting_.begin(), q_.waiting_.end(), id_), q_.waiting_.end());
  }
  q_.cv_.notify_all();
}

void EngineQueue::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancel_.store(true);
  }
  cv_.notify_all();
}

size_t EngineQueue::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return waiting_.size();
}

bool EngineQueue::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_ != 0;
}

}  // namespace moelab::serve
