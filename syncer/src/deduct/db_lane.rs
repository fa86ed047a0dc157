//! The lane MySQL decides in (the `db` tier and the fallback). Its batches do not hold a Redis
//! batch's place: a MySQL batch pays its commit's fsync (milliseconds), and Redis goods must
//! not wait behind it. The lane keeps a few batches in flight, so while one transaction waits
//! for its fsync (InnoDB lets go of the sale row's lock before it), the next takes the row and
//! commits with it in the same group: one fsync for several batches. Groups that arrive while
//! every batch is out are merged per goods into the next one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Semaphore};

use super::{answer_all, decide_in_mysql, Attempt, Batching, DeductError, Delivery};

/// MySQL batches in flight at once. One leaves the disk idle while a batch does its round
/// trips, and the row lock serialises them anyway; a few let InnoDB group their commits
/// (measured in BENCHMARKS.md, tier-benchmark).
pub const DB_BATCHES_IN_FLIGHT: usize = 4;
/// Attempts one MySQL transaction decides at most: bounds how long it holds the sale row.
pub const DB_BATCH_ATTEMPTS_MAX: usize = 256;
/// Groups one batch takes from the queue at most.
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
    let slots = Arc::new(Semaphore::new(DB_BATCHES_IN_FLIGHT));
    let mut taken = Vec::with_capacity(GROUPS_PER_BATCH_MAX);
    // A free slot first, so that while every batch is out the next keeps forming.
    while let Ok(slot) = slots.clone().acquire_owned().await {
        if jobs.recv_many(&mut taken, GROUPS_PER_BATCH_MAX).await == 0 {
            return;
        }
        let n: usize = taken.iter().map(|job| job.group.len()).sum();
        queued.fetch_sub(n, Ordering::AcqRel);
        let merged = merge(&mut taken);
        let batching = batching.clone();
        tokio::spawn(async move {
            let Some(routing) = batching.routing.as_ref() else {
                // Never submitted without routing; answered rather than dropped all the same.
                for job in merged {
                    answer_all(job.group, &DeductError::Stopped);
                }
                return;
            };
            let calls = merged.into_iter().map(|job| {
                let batching = &batching;
                async move {
                    let Job {
                        goods_id,
                        delivery,
                        rated,
                        group,
                    } = job;
                    decide_in_mysql(batching, routing, &goods_id, delivery, group, rated).await;
                }
            });
            futures_util::future::join_all(calls).await;
            drop(slot);
        });
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
}
