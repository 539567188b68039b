//! The process's one wasmtime `Engine`, and the ticker that advances its
//! epoch: every store checks its CPU share and its stop request at a tick.

use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often running wasm is interrupted to account CPU and look for stops.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy)]
pub struct EngineSizing {
    /// Containers (stores) alive at once.
    pub instances: u32,
    /// Largest linear memory of any container, in bytes.
    pub max_memory: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("creating the wasmtime engine: {0}")]
pub struct EngineError(String);

fn base_config() -> Config {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .wasm_component_model(true)
        .memory_init_cow(true);
    config
}

/// The pooled engine; where the pool cannot be reserved (a host limiting
/// virtual memory), an on-demand one, said in the log.
pub fn create(sizing: EngineSizing) -> Result<Engine, EngineError> {
    let slots = sizing.instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        // A component holds several core instances, memories and tables
        // (the program's and its WASI adapter's).
        .total_core_instances(slots * 8)
        .total_memories(slots * 4)
        .total_tables(slots * 8)
        .total_stacks(slots)
        .max_memory_size(sizing.max_memory.min(4 << 30) as usize);
    let mut config = base_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&config) {
        Ok(engine) => Ok(engine),
        Err(pooled) => {
            tracing::warn!("no pooling allocator ({pooled:#}); allocating on demand");
            Engine::new(&base_config()).map_err(|e| EngineError(format!("{e:#}")))
        }
    }
}

/// Advances `engine`'s epoch every [`EPOCH_TICK`] for the process's life.
pub fn start_ticker(engine: &Engine) {
    let engine = engine.clone();
    let _ = std::thread::Builder::new()
        .name("epoch".into())
        .spawn(move || loop {
            // A clock, not a wait for readiness: the tick is the point.
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        });
}
