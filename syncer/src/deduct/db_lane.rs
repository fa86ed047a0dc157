//! The lane MySQL decides in (the `db` tier and the fallback). Its batches do not hold a Redis
//! batch's place: a MySQL batch pays its commit's fsync (milliseconds), and Redis goods must
//! not wait behind it. One batch per goods is out at a time, several goods side by side; what
//! arrives for a goods while its batch is out is merged into its next one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{answer_all, decide_in_mysql, Attempt, Batching, DeductError, Delivery};

/// MySQL batches in flight at once, each of another goods: a goods held up in MySQL leaves
/// the others room.
pub const DB_BATCHES_IN_FLIGHT: usize = 4;
/// Attempts one MySQL transaction decides at most: bounds how long it holds the sale row.
pub const DB_BATCH_ATTEMPTS_MAX: usize = 256;
/// Jobs taken from the queue at one wake-up at most.
const GROUPS_PER_BATCH_MAX: usize = 256;

/// Attempts MySQL must decide, for one goods and delivery.
pub(super) struct Job {
    pub goods_id: String,
    pub delivery: Delivery,
    /// The fallback's rate applies (not the db tier's own decisions).
    pub rated: bool,
    pub group: Vec<Attempt>,
}

/// Handle to the lane; cheap to clone. The lane ends when every handle is dropped.
#[derive(Clone)]
pub(super) struct DbLane {
    queue: mpsc::Sender<Job>,
    /// Attempts queued in the lane, bounded like the deducter's own queue.
    queued: Arc<AtomicUsize>,
}

impl DbLane {
    pub fn start(batching: Arc<Batching>) -> DbLane {
        let (queue, jobs) = mpsc::channel(super::QUEUE_ATTEMPTS_MAX);
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(jobs, batching, queued.clone()));
        DbLane { queue, queued }
    }

    /// Queues the job; answers it `Overloaded` at once when the lane holds too many attempts.
    pub fn submit(&self, job: Job) {
        let n = job.group.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        if before + n > super::QUEUE_ATTEMPTS_MAX {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return answer_all(job.group, &DeductError::Overloaded);
        }
        if let Err(e) = self.queue.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            self.queued.fetch_sub(n, Ordering::AcqRel);
            answer_all(job.group, &DeductError::Overloaded);
        }
    }
}

async fn run(mut jobs: mpsc::Receiver<Job>, batching: Arc<Batching>, queued: Arc<AtomicUsize>) {
    let (finished, mut done) = mpsc::channel::<String>(DB_BATCHES_IN_FLIGHT);
    let mut turns = Turns::default();
    let mut taken = Vec::with_capacity(GROUPS_PER_BATCH_MAX);
    let mut open = true;
    loop {
        tokio::select! {
            n = jobs.recv_many(&mut taken, GROUPS_PER_BATCH_MAX), if open => {
                open = n > 0;
                for job in taken.drain(..) {
                    turns.add(job);
                }
            }
            Some(goods) = done.recv(), if turns.busy() > 0 => turns.done(&goods),
            else => {}
        }
        if !open && turns.is_idle() {
            return;
        }
        while let Some((goods_id, batch)) = turns.next() {
            let n: usize = batch.iter().map(|job| job.group.len()).sum();
            queued.fetch_sub(n, Ordering::AcqRel);
            let (batching, finished) = (batching.clone(), finished.clone());
            tokio::spawn(async move {
                decide_batch(&batching, batch).await;
                let _ = finished.send(goods_id).await;
            });
        }
    }
}

/// One goods' batch: its groups one after the other (they would queue on the sale row's lock
/// anyway).
async fn decide_batch(batching: &Batching, mut batch: Vec<Job>) {
    let merged = merge(&mut batch);
    let Some(routing) = batching.routing.as_ref() else {
        // Never submitted without routing; answered rather than dropped all the same.
        for job in merged {
            answer_all(job.group, &DeductError::Stopped);
        }
        return;
    };
    for job in merged {
        let Job {
            goods_id,
            delivery,
            rated,
            group,
        } = job;
        decide_in_mysql(batching, routing, &goods_id, delivery, group, rated).await;
    }
}

/// Whose turn it is. One batch per goods is out at a time: the sale row's lock is held
/// through the commit's fsync (measured: concurrent commits on one row take an fsync each),
/// so a second batch of the same goods would only wait for the row, and take attempts the
/// first one's successor would have carried. Different goods go out side by side, up to
/// [`DB_BATCHES_IN_FLIGHT`], in the order they started waiting.
#[derive(Default)]
struct Turns {
    waiting: HashMap<String, Vec<Job>>,
    /// Goods with waiting jobs, the longest waiting first.
    order: VecDeque<String>,
    out: HashSet<String>,
}

impl Turns {
    fn add(&mut self, job: Job) {
        let jobs = self.waiting.entry(job.goods_id.clone()).or_default();
        if jobs.is_empty() {
            self.order.push_back(job.goods_id.clone());
        }
        jobs.push(job);
    }

    /// The next goods to send and its batch (its waiting jobs, oldest first, up to
    /// [`DB_BATCH_ATTEMPTS_MAX`] attempts; at least one job), if a batch may go out.
    fn next(&mut self) -> Option<(String, Vec<Job>)> {
        if self.out.len() >= DB_BATCHES_IN_FLIGHT {
            return None;
        }
        let at = self.order.iter().position(|g| !self.out.contains(g))?;
        let goods = self.order.remove(at)?;
        let jobs = self.waiting.get_mut(&goods)?;
        let mut attempts = 0;
        let mut take = 0;
        for job in jobs.iter() {
            if take > 0 && attempts + job.group.len() > DB_BATCH_ATTEMPTS_MAX {
                break;
            }
            attempts += job.group.len();
            take += 1;
        }
        let batch: Vec<Job> = jobs.drain(..take).collect();
        if jobs.is_empty() {
            self.waiting.remove(&goods);
        } else {
            self.order.push_back(goods.clone());
        }
        self.out.insert(goods.clone());
        Some((goods, batch))
    }

    fn done(&mut self, goods: &str) {
        self.out.remove(goods);
    }

    fn busy(&self) -> usize {
        self.out.len()
    }

    fn is_idle(&self) -> bool {
        self.out.is_empty() && self.waiting.is_empty()
    }
}

/// One job per goods, delivery and rate, in arrival order, none over
/// [`DB_BATCH_ATTEMPTS_MAX`] attempts. Attempts whose caller gave up while they waited are
/// answered `TooLate` here: a merged batch must not be decided late for one of them.
fn merge(taken: &mut Vec<Job>) -> Vec<Job> {
    let now = Instant::now();
    let mut merged: Vec<Job> = Vec::new();
    let mut open: HashMap<(String, Delivery, bool), usize> = HashMap::new();
    for mut job in taken.drain(..) {
        let (late, group): (Vec<Attempt>, Vec<Attempt>) =
            job.group.into_iter().partition(|a| a.deadline <= now);
        answer_all(late, &DeductError::TooLate);
        if group.is_empty() {
            continue;
        }
        job.group = group;
        let key = (job.goods_id.clone(), job.delivery, job.rated);
        match open.get(&key) {
            Some(&i) if merged[i].group.len() + job.group.len() <= DB_BATCH_ATTEMPTS_MAX => {
                merged[i].group.extend(job.group);
            }
            _ => {
                open.insert(key, merged.len());
                merged.push(job);
            }
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_api::DeductRequest;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn job(goods: &str, rated: bool, attempts: usize) -> Job {
        job_with_answers(
            goods,
            rated,
            attempts,
            Instant::now() + Duration::from_secs(1),
        )
        .0
    }

    type Answer = oneshot::Receiver<Result<seckill_api::DeductReply, DeductError>>;

    fn job_with_answers(
        goods: &str,
        rated: bool,
        attempts: usize,
        deadline: Instant,
    ) -> (Job, Vec<Answer>) {
        let mut answers = Vec::new();
        let group = (0..attempts)
            .map(|i| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                Attempt {
                    request: DeductRequest {
                        goods_id: goods.into(),
                        user_id: format!("u{i}"),
                        quantity: 1,
                        request_id: format!("r{i}"),
                    },
                    delivery: Delivery::Claimed,
                    deadline,
                    reply,
                }
            })
            .collect();
        let job = Job {
            goods_id: goods.into(),
            delivery: Delivery::Claimed,
            rated,
            group,
        };
        (job, answers)
    }

    #[test]
    fn groups_merge_per_goods_and_rate_within_the_batch_bound() {
        let (late, mut late_answers) = job_with_answers("c", false, 5, Instant::now());
        let mut taken = vec![
            job("a", false, 3),
            job("b", false, 2),
            job("a", false, 4),
            job("a", true, 1),
            job("a", false, DB_BATCH_ATTEMPTS_MAX - 7),
            late,
            job("a", false, 1),
        ];
        let merged = merge(&mut taken);
        let shape: Vec<(&str, bool, usize)> = merged
            .iter()
            .map(|j| (j.goods_id.as_str(), j.rated, j.group.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a", false, DB_BATCH_ATTEMPTS_MAX),
                ("b", false, 2),
                ("a", true, 1),
                ("a", false, 1),
            ]
        );
        assert!(taken.is_empty());
        // The attempts whose callers gave up are answered, not decided.
        for answer in &mut late_answers {
            assert!(matches!(answer.try_recv(), Ok(Err(DeductError::TooLate))));
        }
    }

    fn sizes(batch: &[Job]) -> Vec<usize> {
        batch.iter().map(|job| job.group.len()).collect()
    }

    #[test]
    fn one_batch_per_goods_is_out_and_the_rest_wait_their_turn() {
        let mut turns = Turns::default();
        turns.add(job("a", false, 3));
        turns.add(job("b", false, 1));
        turns.add(job("a", true, 2));
        let (goods, batch) = turns.next().unwrap();
        assert_eq!((goods.as_str(), sizes(&batch)), ("a", vec![3, 2]));
        let (goods, batch) = turns.next().unwrap();
        assert_eq!((goods.as_str(), sizes(&batch)), ("b", vec![1]));
        // a is out: what arrives for it waits for its batch to come back, merged.
        turns.add(job("a", false, 4));
        turns.add(job("a", false, 5));
        assert!(turns.next().is_none());
        turns.done("a");
        let (goods, batch) = turns.next().unwrap();
        assert_eq!((goods.as_str(), sizes(&batch)), ("a", vec![4, 5]));
        turns.done("a");
        turns.done("b");
        assert!(turns.is_idle());
    }

    #[test]
    fn batches_and_goods_out_are_bounded() {
        let mut turns = Turns::default();
        turns.add(job("a", false, DB_BATCH_ATTEMPTS_MAX - 10));
        turns.add(job("a", false, 11));
        let (_, batch) = turns.next().unwrap();
        assert_eq!(sizes(&batch), vec![DB_BATCH_ATTEMPTS_MAX - 10]);
        turns.done("a");
        let (_, batch) = turns.next().unwrap();
        assert_eq!(sizes(&batch), vec![11]);
        turns.done("a");
        for g in 0..DB_BATCHES_IN_FLIGHT + 2 {
            turns.add(job(&format!("g{g}"), false, 1));
        }
        let out: Vec<String> = std::iter::from_fn(|| turns.next().map(|(g, _)| g)).collect();
        let first: Vec<String> = (0..DB_BATCHES_IN_FLIGHT).map(|g| format!("g{g}")).collect();
        assert_eq!(
            out, first,
            "the longest waiting go first, no more than the bound"
        );
        turns.done("g0");
        assert_eq!(turns.next().map(|(g, _)| g).as_deref(), Some("g4"));
    }
}
