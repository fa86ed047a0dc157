//! The upstreams of `scripts/edge-instructions.py`: the stub shop (200 to everything) and the
//! stub deduct endpoint (every attempt wins), served outside the Envoy that callgrind counts.
//!
//! Prints one JSON line with their ports, then answers each line read on stdin with a JSON
//! line of the stub deduct's counters; exits when stdin closes.

use std::io::BufRead;

use seckill_e2e::deduct_stub::DeductStub;
use seckill_e2e::shop::ShopStub;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let shop = ShopStub::start().await?;
    let deduct = DeductStub::start().await?;
    println!(
        "{}",
        serde_json::json!({"shop": shop.addr.port(), "deduct": deduct.addr.port()})
    );
    // stdin is read on a thread of its own: the stubs keep serving on the runtime meanwhile.
    let lines = tokio::task::spawn_blocking(move || {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() {
                break;
            }
            println!(
                "{}",
                serde_json::json!({"calls": deduct.calls(), "attempts": deduct.attempts()})
            );
        }
    });
    lines.await?;
    drop(shop);
    Ok(())
}
