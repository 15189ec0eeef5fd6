//! The few llama.cpp calls that `llama-cpp-2` does not wrap: a ggml thread pool for a model's contexts.
//! The only `unsafe` code of this crate; every block says why it is sound.
#![allow(unsafe_code)]

use llama_cpp_2::context::LlamaContext;
use std::rc::Rc;

/// A ggml thread pool, shared by the contexts of one model on its worker thread. Without one, llama.cpp
/// (built without OpenMP, see the workspace's `Cargo.toml`) creates and joins its threads for every graph it
/// computes, that is, for every token; a kept pool's threads poll briefly for the next graph, then sleep.
pub struct ThreadPool(std::ptr::NonNull<llama_cpp_sys_2::ggml_threadpool>);

impl ThreadPool {
    /// A pool of `threads` threads (the calling thread counts as one); `None` if ggml cannot make it.
    pub fn new(threads: i32) -> Option<Rc<ThreadPool>> {
        // SAFETY: fills and returns a parameter block by value; no pointers involved.
        let mut params = unsafe { llama_cpp_sys_2::ggml_threadpool_params_default(threads) };
        // SAFETY: `params` is an initialized parameter block that ggml only reads during the call; the
        // result is null (no pool) or a pool this value owns and frees once, in `drop`.
        let pool = unsafe { llama_cpp_sys_2::ggml_threadpool_new(&mut params) };
        std::ptr::NonNull::new(pool).map(|p| Rc::new(ThreadPool(p)))
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: the pool came from `ggml_threadpool_new` and is freed only here, when the last
        // `PooledContext` holding it is gone (each drops its context before its share of the pool).
        unsafe { llama_cpp_sys_2::ggml_threadpool_free(self.0.as_ptr()) }
    }
}

/// A context that computes on a thread pool it keeps alive. It derefs to the context.
pub struct PooledContext<'m> {
    // Field order matters: the context is dropped before the pool it computes on.
    ctx: LlamaContext<'m>,
    _pool: Option<Rc<ThreadPool>>,
}

impl<'m> PooledContext<'m> {
    /// Attaches `pool` to `ctx` (without a pool, llama.cpp makes threads per graph, as before).
    pub fn new(mut ctx: LlamaContext<'m>, pool: Option<Rc<ThreadPool>>) -> PooledContext<'m> {
        if let Some(pool) = &pool {
            // SAFETY: the context pointer is valid while `ctx` lives; the pool lives at least as long as
            // the context, because this value holds both and drops the context first. A pool is shared only
            // by contexts on one thread (`Rc` is not `Send`), so it computes one graph at a time.
            unsafe {
                llama_cpp_sys_2::llama_attach_threadpool(
                    ctx.as_mut_ptr(),
                    pool.0.as_ptr(),
                    pool.0.as_ptr(),
                )
            }
        }
        PooledContext { ctx, _pool: pool }
    }
}

// Only shared access derefs: a `&mut LlamaContext` could be swapped out (`std::mem::replace`) and outlive the
// pool it still computes on. The few mutating calls are forwarded instead.
impl<'m> std::ops::Deref for PooledContext<'m> {
    type Target = LlamaContext<'m>;
    fn deref(&self) -> &Self::Target {
        &self.ctx
    }
}

impl PooledContext<'_> {
    pub fn decode(
        &mut self,
        batch: &mut llama_cpp_2::llama_batch::LlamaBatch,
    ) -> Result<(), llama_cpp_2::DecodeError> {
        self.ctx.decode(batch)
    }

    pub fn clear_kv_cache(&mut self) {
        self.ctx.clear_kv_cache()
    }

    pub fn clear_kv_cache_seq(
        &mut self,
        seq: Option<u32>,
        p0: Option<u32>,
        p1: Option<u32>,
    ) -> Result<bool, llama_cpp_2::context::kv_cache::KvCacheConversionError> {
        self.ctx.clear_kv_cache_seq(seq, p0, p1)
    }
}
