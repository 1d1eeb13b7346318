//! The minimal hyper proxy on jemalloc, the allocator Wakegate ships with (see the library's
//! documentation).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::io::Result<()> {
    wakegate_bench_hyper_proxy::run()
}
