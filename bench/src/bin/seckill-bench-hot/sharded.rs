//! `--sharded`: where the two goods land on the local cluster, and the section of BENCHMARKS.md
//! that puts one goods sharded over the masters beside one unsharded goods on one master, with
//! Redis's CPU per decision on each master and what N masters would give.

use std::collections::HashSet;

use seckill_e2e::redis_cluster::RedisCluster;
use seckill_syncer::keys::{shard_id, KeySpace};

use super::{label, median, of, rate_row, ratios, sides, Args, Measured, Side, Target};

/// How many goods ids `place` tries for one whose shards spread over the masters.
const PLACE_TRIES: usize = 1_000;

/// Where the two goods of a `--sharded` run live.
pub struct Placement<'a> {
    pub flat: &'a Target,
    pub sharded: &'a Target,
    pub masters: usize,
}

/// The goods `stem` unsharded (`shards` None), or a goods `{stem}-N` with `shards` shards whose
/// hash tags land on as many different masters as there are (one per master for 3 shards on
/// 3 masters), each part with the index of its master in `masters` (as `Bench::nodes`).
pub async fn place(
    cluster: &RedisCluster,
    masters: &[u16],
    keys: &KeySpace,
    stem: &str,
    shards: Option<u32>,
) -> anyhow::Result<Target> {
    let node_of = |port: u16| {
        masters
            .iter()
            .position(|&p| p == port)
            .ok_or_else(|| anyhow::anyhow!("port {port} is not a master"))
    };
    let Some(shards) = shards else {
        let port = cluster.master_of_key(&keys.goods(stem).sale).await?;
        return Ok(Target {
            goods: stem.into(),
            parts: vec![(stem.into(), node_of(port)?)],
        });
    };
    let wanted = (shards as usize).min(masters.len());
    for i in 0..PLACE_TRIES {
        let goods = format!("{stem}-{i}");
        let mut parts = Vec::new();
        for shard in 0..shards {
            let id = shard_id(&goods, shard);
            let port = cluster.master_of_key(&keys.goods(&id).sale).await?;
            parts.push((id, node_of(port)?));
        }
        let spread: HashSet<usize> = parts.iter().map(|(_, node)| *node).collect();
        if spread.len() == wanted {
            return Ok(Target { goods, parts });
        }
    }
    anyhow::bail!("no goods {stem}-N in {PLACE_TRIES} whose shards land on {wanted} masters")
}

/// Masters counted from 1, as the tables name them.
fn masters_of(target: &Target) -> String {
    let named: Vec<String> = target
        .parts
        .iter()
        .map(|(id, node)| format!("`{id}` on master {}", node + 1))
        .collect();
    named.join(", ")
}

/// The median of `f` over `side`'s runs.
fn med(rounds: &[Vec<Measured>], side: Side, f: impl Fn(&Measured) -> f64) -> f64 {
    median(of(rounds, side).iter().map(f))
}

/// Redis main-thread CPU µs per decision on master `node` (of the goods' decisions).
fn node_cpu_us(x: &Measured, node: usize) -> f64 {
    x.per_node
        .get(node)
        .map_or(f64::NAN, |c| c.cpu_usec_per_decision(x.redis_decisions))
}

/// The most any one master spent per decision: the master that fills first.
fn busiest_cpu_us(x: &Measured) -> f64 {
    (0..x.per_node.len())
        .map(|n| node_cpu_us(x, n))
        .fold(f64::NAN, f64::max)
}

pub fn render(args: &Args, placed: &Placement, rounds: &[Vec<Measured>]) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let masters = placed.masters;
    let mut ratio_rows = String::new();
    let mut rate_rows = String::new();
    let mut cost_rows = String::new();
    let mut projection_rows = String::new();
    for &size in &args.batch_sizes {
        let (flat, sharded) = (Side::Batch(size), Side::Sharded(size));
        let per_round = ratios(rounds, sharded, flat);
        let listed: Vec<String> = per_round.iter().map(|r| format!("{r:.2}x")).collect();
        let cpu = |side: Side| {
            med(rounds, side, |x| {
                x.redis.cpu_usec_per_decision(x.redis_decisions)
            })
        };
        let busiest = |side: Side| med(rounds, side, busiest_cpu_us);
        ratio_rows.push_str(&format!(
            "| {size} | **{:.2}x** | {} | **{:.2}x** | **{:.2}x** |\n",
            median(per_round.iter().copied()),
            listed.join(", "),
            cpu(sharded) / cpu(flat),
            busiest(flat) / busiest(sharded),
        ));
        // One unsharded goods is decided on one master however many there are: its master's
        // core is its ceiling. The sharded goods spreads over N masters: N cores at its
        // summed cost per decision (the busiest master fills first: the measured 3).
        let flat_core = 1e6 / busiest(flat);
        let sharded_core = 1e6 / cpu(sharded);
        let projected: Vec<String> = [3.0, 6.0, 12.0]
            .iter()
            .map(|n| format!("{:.0}", n * sharded_core))
            .collect();
        projection_rows.push_str(&format!(
            "| {size} | {flat_core:.0} | {sharded_core:.0} | {:.0} | {} |\n",
            1e6 / busiest(sharded),
            projected.join(" | "),
        ));
    }
    for side in sides(args) {
        let runs = of(rounds, side);
        let m = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f));
        rate_rows.push_str(&rate_row(side, &runs));
        let per_master: Vec<String> = (0..masters)
            .map(|n| format!("{:.2}", m(&|x| node_cpu_us(x, n))))
            .collect();
        let summed = m(&|x| x.redis.cpu_usec_per_decision(x.redis_decisions));
        cost_rows.push_str(&format!(
            "| {} | {:.1} | {:.2} | {} | **{summed:.2}** | {:.0} |\n",
            label(side),
            m(&|x| x.redis.decisions_per_call(x.redis_decisions)),
            m(&|x| x.redis.script_usec_per_decision(x.redis_decisions)),
            per_master.join(" | "),
            1e6 / summed,
        ));
    }
    let not_won: u64 = rounds.iter().flatten().map(|m| m.not_won).sum();
    let master_heads: String = (1..=masters).map(|n| format!(" master {n} |")).collect();
    let master_rules = "---|".repeat(masters);
    let sizes: Vec<String> = args.batch_sizes.iter().map(usize::to_string).collect();
    format!(
        "## One hot goods sharded over {masters} masters against one master

Command: `bash scripts/bench.sh` (runs `target/release/seckill-bench-hot --sharded --shards \
{shards} --seconds {secs} --rounds {rounds} --batch-sizes {sizes} --connections {c}`).

Conditions: this machine ({cores} cores shared by the {masters} Redis masters, the syncer, the \
load generator and whatever else runs), a local Redis Cluster of {masters} masters without \
replicas or persistence, one syncer in release build on the cluster's URL (no pipeline; claim \
window one hour, so the sweeper releases nothing during a run). Two goods with a stock no run \
sells out, both defined and preheated through the admin API: one of the `redis` tier \
({flat}), and one of the `redis_sharded` tier with {shards} shards ({sharded}; the stock \
split evenly, so no attempt ever moves units between shards). wrk, 1 thread, {c} connections, \
{secs} s per run, `POST {path}` with N attempts per call, each a new buyer and request id. \
The syncer (no durability setting) has one batch out at a time: it takes up to {max} queued \
attempts, whatever HTTP calls they came in, and sends the unsharded goods one script call for \
them, the sharded goods one call per shard for the attempts whose home shard it is (about \
{max}/{shards} each), the shards' calls side by side on their masters. {rounds} \
rounds, each measuring every side once, in alternating order; a ratio is the median over \
rounds of the two sides' figures within one round, the absolute figures each side's median \
round. A decision is an attempt answered `won` (every attempt must win; {not_won} did not); \
Redis's own count, the sum of the shards' order sequences (one goods' sequence unsharded), \
must hold every one, plus at most the attempts wrk left in flight. Between runs each goods' \
(each shard's) buyers, requests, reservations and outbox are deleted.

**What this run can and cannot show.** On {cores} cores the masters, the syncer and the load \
generator share the CPUs, so the wall-clock decisions/s cannot show the scaling: three masters \
without cores of their own cannot add two more cores of capacity. Whatever wall-clock gain the \
sharded side shows here comes from the syncer's one batch out at a time coming back sooner \
when its calls run side by side on three masters, on CPU the unsharded side left idle (see \
the Redis cores column): it is bounded by this machine, not by three masters' capacity. What \
projects is Redis's own CPU per \
decision (`INFO cpu`'s main thread, read on every master around each run; `INFO \
commandstats` for the script calls): one master's core is the ceiling of an unsharded goods, \
and a goods sharded over N masters, each with its own core, has N of them.

| attempts per call | decisions/s: sharded / unsharded (median) | per round | Redis CPU per decision, all masters: sharded / unsharded | busiest master's CPU per decision: unsharded / sharded (the capacity gain of {masters} masters) |
|---|---|---|---|---|
{ratio_rows}
| side | decisions/s | decisions answered / counted in Redis (all rounds) | p50 per call | p99 per call | Redis cores (all masters) | syncer cores | load generator cores | other cores |
|---|---|---|---|---|---|---|---|---|
{rate_rows}
### What Redis spends per decision, on each master and summed

Each master's main-thread CPU during a run divided by the goods' decisions in that run (so the \
masters' columns add up to the sum; a master holding no key of the goods shows the cluster's \
own background work). Decisions per script call: the goods' decisions over the script calls \
of every master.

| side | decisions per script call | script µs per decision (commandstats) |{master_heads} Redis CPU µs per decision, summed | decisions/s per Redis core (at the summed cost) |
|---|---|---|{master_rules}---|---|
{cost_rows}
### Projection: N masters, each with a core of its own, if the syncer and HTTP were not the limit

Unsharded: one goods lives on one master, so its ceiling is that master's core at its cost \
per decision, however many masters there are. Sharded over N masters (N shards, one per \
master): N cores at the summed cost per decision measured here with {shards} shards. For \
larger N that is an upper bound: one syncer's batch of up to {max} attempts is split over the \
N shards, so each script call carries about {max}/N attempts and a call's fixed cost is shared \
by fewer decisions (the cost table shows what a call of {max} and a call of about {max}/{shards} \
cost per decision); it also assumes the syncers and the HTTP side run on cores of their own \
(several syncers behind the gates, each sending every master its own calls). The column for \
{masters} masters measured: the decisions/s at which the busiest master's core is full.

| attempts per call | unsharded, one master (any N) | sharded, per Redis core | sharded, {masters} masters (busiest master full, measured) | sharded, N = 3 | N = 6 | N = 12 |
|---|---|---|---|---|---|---|
{projection_rows}",
        shards = args.shards,
        secs = args.seconds,
        rounds = args.rounds,
        sizes = sizes.join(","),
        c = args.connections,
        flat = masters_of(placed.flat),
        sharded = masters_of(placed.sharded),
        path = seckill_api::DEDUCT_BATCH_PATH,
        max = seckill_syncer::deduct::BATCH_ATTEMPTS_MAX,
    )
}
