// Status codes returned by every C++ entry point. Only python/ turns them into
// Python exceptions, so no C++ exception crosses a thread or a CUDA callback.
#pragma once

#include <string>
#include <utility>

namespace lmc {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // a caller's value is out of range or inconsistent
  kOutOfMemory = 2,      // an allocation the caller asked for failed
  kCudaError = 3,        // the CUDA runtime reported an error
  kUnavailable = 4,      // the feature was not built in or has no device
};

class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status OutOfMemory(std::string m) { return {StatusCode::kOutOfMemory, std::move(m)}; }
  static Status CudaError(std::string m) { return {StatusCode::kCudaError, std::move(m)}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace lmc
