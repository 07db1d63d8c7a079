#pragma once
// Requests run on the engine one at a time, in arrival order, through a bounded queue: at most
// `max_waiting` requests wait while one runs; one more is refused (HTTP 429). Batching several sequences
// into one forward call is a later step.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

namespace moelab::serve {

class EngineQueue {
 public:
  explicit EngineQueue(size_t max_waiting) : max_waiting_(max_waiting) {}

  // A place in the queue; destroying it leaves the queue (or frees the engine when it was running).
  class Ticket {
   public:
    ~Ticket();
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    // Blocks until this request may run the engine; ApiError 503 when the server is shutting down.
    void wait_turn();

   private:
    friend class EngineQueue;
    Ticket(EngineQueue& q, uint64_t id) : q_(q), id_(id) {}
    EngineQueue& q_;
    uint64_t id_;
  };

  // A place, or nullptr when the queue is full.
  std::unique_ptr<Ticket> try_enter();

  // Refuses every waiting and future request (ApiError 503) and sets the cancel flag the running request reads.
  void shutdown();
  bool shutting_down() const { return cancel_.load(); }
  const std::atomic<bool>* cancel_flag() const { return &cancel_; }

  size_t waiting() const;
  bool running() const;
  size_t max_waiting() const { return max_waiting_; }

 private:
  const size_t max_waiting_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint64_t> waiting_;
  uint64_t running_ = 0;  // 0: the engine is free
  uint64_t next_id_ = 1;
  std::atomic<bool> cancel_{false};
};

}  // namespace moelab::serve
