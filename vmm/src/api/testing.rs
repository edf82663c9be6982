//! Test helpers: a fake handler and unique socket paths.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{ApiError, ApiHandler, ApiRequest, ApiResponse};

/// Records every request and answers each with the same canned result.
#[derive(Debug)]
pub struct FakeHandler {
    pub answer: Result<ApiResponse, ApiError>,
    pub seen: Mutex<Vec<ApiRequest>>,
}

impl FakeHandler {
    pub fn answering(answer: Result<ApiResponse, ApiError>) -> Self {
        Self {
            answer,
            seen: Mutex::new(Vec::new()),
        }
    }

    pub fn seen(&self) -> Vec<ApiRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl ApiHandler for FakeHandler {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.seen.lock().unwrap().push(request);
        self.answer.clone()
    }
}

/// A fresh directory for one test's socket, removed by the caller.
pub fn socket_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "api-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
