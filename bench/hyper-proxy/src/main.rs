//! The minimal hyper proxy on the system allocator (see the library's documentation).

fn main() -> std::io::Result<()> {
    wakegate_bench_hyper_proxy::run()
}
