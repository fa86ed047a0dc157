//! The batched MySQL writer: consumes sale events from Kafka and applies them to MySQL.
//!
//! A batch closes at `batch_size_max` events or `batch_wait` after its first event. It is
//! applied in one transaction that inserts the orders that are really new (the order id is the
//! primary key, so a redelivered event changes nothing) and updates each goods' counters once
//! with the aggregated quantity. Kafka offsets are committed only after the database commit.
//! Messages that cannot be parsed or applied go to the dead-letter topic with the reason.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{MySql, MySqlPool, QueryBuilder, Row, Transaction};
use tokio_util::sync::CancellationToken;

use crate::crashpoint::{crashpoint, WRITER_AFTER_DB_COMMIT};
use crate::events::{Effect, SaleEvent};
use crate::kafka::KafkaConfig;

/// Rows per multi-row INSERT: 7 values each stays far below MySQL's 65,535 placeholders.
const INSERT_ROWS_MAX: usize = 1_000;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);
/// Bound on Kafka's blocking calls (commit, watermarks).
const KAFKA_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub kafka: KafkaConfig,
    /// A batch closes at this many events...
    pub batch_size_max: usize,
    /// ...or this long after its first event, whichever comes first.
    pub batch_wait: Duration,
    /// Partitions this writer applies (None: all). Writers sharing a topic split its
    /// partitions between them; an overlap is safe (idempotent) but wasted work.
    pub partitions: Option<Vec<i32>>,
}

pub struct Writer {
    pub mysql: MySqlPool,
    pub config: WriterConfig,
    /// Publishes dead letters.
    pub producer: FutureProducer,
}

/// A message the writer gives up on, with the reason.
#[derive(Debug)]
struct DeadLetter<'a> {
    message: &'a OwnedMessage,
    reason: String,
}

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub new_orders: usize,
    /// Orders moved from reserved to confirmed or released.
    pub transitions: usize,
    pub duplicates: usize,
    pub dead_letters: usize,
}

pub fn consumer(config: &KafkaConfig) -> anyhow::Result<StreamConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        // Offsets are ours to commit, after the database commit.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("socket.timeout.ms", "5000")
        // Some brokers (Tansu) hold every fetch for the full wait even when data is ready;
        // a short wait keeps a backlog draining fast and costs an idle writer little.
        .set("fetch.wait.max.ms", "20")
        // Bounds what librdkafka prefetches while a batch is being applied.
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))
}

impl Writer {
    /// Consumes and applies until `shutdown`; then finishes the batch in hand, commits it and
    /// returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let consumer = Arc::new(consumer(&self.config.kafka)?);
        let Some(partitions) = self.assign(&consumer, &shutdown).await? else {
            return Ok(());
        };
        tracing::info!(
            topic = %self.config.kafka.topic, group = %self.config.kafka.group, ?partitions,
            "writer started"
        );
        let mut last_lag = Instant::now();
        loop {
            let batch = self.collect(&consumer, &shutdown).await;
            if !batch.is_empty() {
                let Some(applied) = self.apply_until_done(&batch, &shutdown).await else {
                    // Shut down before the batch could be applied: commit nothing, so the
                    // batch is read again by whoever consumes next.
                    break;
                };
                // A failed commit is retried by the next batch's commit, which covers these
                // offsets too; a crash before it only redelivers events MySQL already has.
                match commit_offsets(&consumer, &batch) {
                    Ok(()) => tracing::debug!(?applied, events = batch.len(), "batch committed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "offset commit failed; the next commit covers it")
                    }
                }
            }
            if last_lag.elapsed() >= Duration::from_secs(1) {
                last_lag = Instant::now();
                if let Some(lag) = consumer_lag(&consumer) {
                    metrics::gauge!("seckill_consumer_lag").set(lag as f64);
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
        tracing::info!("writer stopped");
        Ok(())
    }

    /// Takes the configured partitions (all by default) and resumes each from the group's
    /// committed offset. Static assignment, not group membership: a restarted writer owns
    /// its partitions at once, with no rebalance in the middle of a sale (and none of the
    /// rebalance gaps some Kafka-compatible brokers have). Waits, bounded by shutdown, for the
    /// topic to exist. Returns `None` if shut down first.
    async fn assign(
        &self,
        consumer: &StreamConsumer,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<i32>>> {
        let topic = &self.config.kafka.topic;
        let mut backoff = BACKOFF_FIRST;
        loop {
            let found = tokio::task::block_in_place(|| {
                consumer.fetch_metadata(Some(topic), KAFKA_CALL_TIMEOUT)
            })
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect::<Vec<i32>>()
            });
            match found {
                Ok(mut partitions) if !partitions.is_empty() => {
                    if let Some(wanted) = &self.config.partitions {
                        let missing: Vec<&i32> =
                            wanted.iter().filter(|p| !partitions.contains(p)).collect();
                        anyhow::ensure!(
                            missing.is_empty(),
                            "topic {topic} has no partitions {missing:?} (it has {partitions:?})"
                        );
                        partitions = wanted.clone();
                    }
                    let list = self.resume_offsets(consumer, &partitions)?;
                    consumer.assign(&list).map_err(|e| {
                        anyhow::anyhow!("cannot assign {topic} {partitions:?}: {e}")
                    })?;
                    return Ok(Some(partitions));
                }
                Ok(_) => tracing::warn!(%topic, "topic not found yet; waiting"),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "cannot read topic metadata; retrying")
                }
            }
            // The topic may not exist yet: retry with a bounded backoff, shutdown cuts it short.
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    /// Each partition's committed offset; a partition never committed starts at the
    /// beginning (asked for explicitly: left to the broker, "no offset" can mean the end,
    /// which would skip every event published before this writer first started).
    fn resume_offsets(
        &self,
        consumer: &StreamConsumer,
        partitions: &[i32],
    ) -> anyhow::Result<TopicPartitionList> {
        let topic = &self.config.kafka.topic;
        let mut wanted = TopicPartitionList::new();
        for partition in partitions {
            wanted.add_partition(topic, *partition);
        }
        let committed =
            tokio::task::block_in_place(|| consumer.committed_offsets(wanted, KAFKA_CALL_TIMEOUT))
                .map_err(|e| anyhow::anyhow!("cannot read committed offsets of {topic}: {e}"))?;
        let mut list = TopicPartitionList::new();
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(at) if at >= 0 => Offset::Offset(at),
                _ => Offset::Beginning,
            };
            tracing::info!(%topic, partition = element.partition(), ?offset, "resuming partition");
            list.add_partition_offset(topic, element.partition(), offset)?;
        }
        Ok(list)
    }

    /// Waits for a first message, then takes more until the batch is full or its time is up.
    async fn collect(
        &self,
        consumer: &StreamConsumer,
        shutdown: &CancellationToken,
    ) -> Vec<OwnedMessage> {
        let mut batch = Vec::new();
        let first = tokio::select! {
            () = shutdown.cancelled() => return batch,
            // A pause now and then lets the caller refresh the lag gauge.
            () = tokio::time::sleep(Duration::from_secs(1)) => return batch,
            message = consumer.recv() => message,
        };
        match first {
            Ok(message) => batch.push(message.detach()),
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive failed");
                return batch;
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.batch_wait;
        while batch.len() < self.config.batch_size_max {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => break,
                message = consumer.recv() => match message {
                    Ok(message) => batch.push(message.detach()),
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka receive failed");
                        break;
                    }
                },
            }
        }
        batch
    }

    /// Applies a batch and publishes its dead letters, retrying with backoff while MySQL or
    /// Kafka is away. Every step is idempotent, so a retry after a partial success is safe.
    /// Returns `None` only if shutdown came first.
    async fn apply_until_done(
        &self,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Option<Applied> {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let started = Instant::now();
            let result = match self.apply(batch).await {
                Ok((applied, dead)) => self.publish_dead_letters(&dead).await.map(|()| applied),
                Err(e) => Err(e),
            };
            match result {
                Ok(applied) => {
                    metrics::histogram!("seckill_writer_batch_events").record(batch.len() as f64);
                    metrics::histogram!("seckill_writer_batch_duration_seconds")
                        .record(started.elapsed());
                    metrics::counter!("seckill_writer_orders_total")
                        .increment(applied.new_orders as u64);
                    metrics::counter!("seckill_writer_transitions_total")
                        .increment(applied.transitions as u64);
                    metrics::counter!("seckill_writer_duplicates_total")
                        .increment(applied.duplicates as u64);
                    return Some(applied);
                }
                Err(e) => {
                    metrics::counter!("seckill_writer_errors_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, events = batch.len(), "batch not applied; offsets not committed");
                }
            }
            // MySQL or Kafka is away: retry with a bounded backoff, shutdown cuts it short.
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    /// One transaction for the whole batch. If MySQL refuses the batch for a reason of its
    /// data (not its connection), each event is applied alone and the ones MySQL refuses become
    /// dead letters, so one bad event cannot block its partition.
    async fn apply<'a>(
        &self,
        batch: &'a [OwnedMessage],
    ) -> anyhow::Result<(Applied, Vec<DeadLetter<'a>>)> {
        let mut dead = Vec::new();
        let mut events = Vec::with_capacity(batch.len());
        for message in batch {
            match message.payload().map(SaleEvent::from_json) {
                Some(Ok(event)) => events.push((message, event)),
                Some(Err(e)) => dead.push(DeadLetter {
                    message,
                    reason: e.to_string(),
                }),
                None => dead.push(DeadLetter {
                    message,
                    reason: "empty message".into(),
                }),
            }
        }
        let parsed: Vec<&SaleEvent> = events.iter().map(|(_, e)| e).collect();
        match apply_events(&self.mysql, &parsed).await {
            Ok((mut applied, refused)) => {
                for (index, reason) in refused {
                    dead.push(DeadLetter {
                        message: events[index].0,
                        reason,
                    });
                }
                applied.dead_letters = dead.len();
                Ok((applied, dead))
            }
            Err(sqlx::Error::Database(e)) => {
                tracing::warn!(error = %e, "MySQL refused the batch; applying its events one by one");
                let mut applied = Applied::default();
                for (message, event) in &events {
                    match apply_events(&self.mysql, &[event]).await {
                        Ok((a, refused)) => {
                            applied.new_orders += a.new_orders;
                            applied.transitions += a.transitions;
                            applied.duplicates += a.duplicates;
                            for (_, reason) in refused {
                                dead.push(DeadLetter { message, reason });
                            }
                        }
                        Err(sqlx::Error::Database(e)) => dead.push(DeadLetter {
                            message,
                            reason: format!("MySQL refused it: {e}"),
                        }),
                        Err(e) => return Err(e.into()),
                    }
                }
                applied.dead_letters = dead.len();
                Ok((applied, dead))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn publish_dead_letters(&self, dead: &[DeadLetter<'_>]) -> anyhow::Result<()> {
        for letter in dead {
            let message = letter.message;
            tracing::warn!(
                topic = message.topic(), partition = message.partition(), offset = message.offset(),
                reason = %letter.reason, "message sent to the dead-letter topic"
            );
            let source = format!(
                "{}/{}/{}",
                message.topic(),
                message.partition(),
                message.offset()
            );
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(letter.reason.as_bytes()),
                })
                .insert(Header {
                    key: "source",
                    value: Some(source.as_bytes()),
                });
            let mut record = FutureRecord::to(&self.config.kafka.dead_letter_topic)
                .payload(message.payload().unwrap_or_default())
                .headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            self.producer
                .send(record, Duration::ZERO)
                .await
                .map_err(|(e, _)| anyhow::anyhow!("cannot publish a dead letter: {e}"))?;
            metrics::counter!("seckill_dead_letters_total", "source" => "kafka").increment(1);
        }
        Ok(())
    }
}

/// Applies sale events to MySQL in one transaction: inserts the orders that are really new,
/// moves orders along their life (reserved -> confirmed or released), and updates each goods'
/// counters once. Returns what was applied and, by index into `events`, the events refused for
/// their content (no such sale or order in MySQL; more units than MySQL's stock, which means
/// drift; a transition the order cannot make). Public so the benchmark measures exactly the
/// writer's apply.
pub async fn apply_events(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<(Applied, Vec<(usize, String)>), sqlx::Error> {
    if events.is_empty() {
        return Ok((Applied::default(), Vec::new()));
    }
    match apply_fresh(mysql, events).await {
        Ok(Some(applied)) => return Ok((applied, Vec::new())),
        // Something in the batch is not a plainly new reservation (a redelivery, a state
        // change, an unknown goods, stock MySQL does not have): the careful path sorts it out.
        Ok(None) | Err(sqlx::Error::Database(_)) => {}
        Err(e) => return Err(e),
    }
    apply_checked(mysql, events).await
}

/// The common case during a sale, in three statements: every event is a new reservation for a
/// known goods with stock to cover it. The order id's primary key and the `stock >= 0` check
/// make MySQL refuse the transaction otherwise (`Err(Database)`), as does a goods without a
/// sale row (`Ok(None)`); nothing is committed then.
async fn apply_fresh(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<Option<Applied>, sqlx::Error> {
    let mut seen = HashSet::with_capacity(events.len());
    let plain = events
        .iter()
        .all(|e| matches!(e, SaleEvent::Reserved { .. }) && seen.insert(e.order_id()));
    if !plain {
        return Ok(None);
    }
    let mut deltas: HashMap<&str, Effect> = HashMap::new();
    for event in events {
        add(deltas.entry(event.goods_id()).or_default(), event.effect());
    }
    let rows: Vec<NewOrder> = events.iter().map(|e| NewOrder::reserved(e)).collect();
    let mut tx = mysql.begin().await?;
    insert_orders(&mut tx, &rows).await?;
    for (goods_id, delta) in &deltas {
        if update_sale(&mut tx, goods_id, delta).await? != 1 {
            return Ok(None);
        }
    }
    tx.commit().await?;
    crashpoint(WRITER_AFTER_DB_COMMIT);
    Ok(Some(Applied {
        new_orders: events.len(),
        ..Applied::default()
    }))
}

fn add(total: &mut Effect, effect: Effect) {
    total.available += effect.available;
    total.reserved += effect.reserved;
    total.sold += effect.sold;
    total.lapsed += effect.lapsed;
}

/// An order row as the batch leaves it.
#[derive(Debug, Clone)]
struct NewOrder<'a> {
    reserved: &'a SaleEvent,
    state: &'static str,
    reason: Option<&'a str>,
    returned: Option<bool>,
}

impl<'a> NewOrder<'a> {
    fn reserved(event: &'a SaleEvent) -> Self {
        NewOrder {
            reserved: event,
            state: "reserved",
            reason: None,
            returned: None,
        }
    }
}

async fn insert_orders(
    tx: &mut Transaction<'_, MySql>,
    rows: &[NewOrder<'_>],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(INSERT_ROWS_MAX) {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT INTO orders (order_id, goods_id, user_id, quantity, request_id, state, \
             release_reason, stock_returned, reserved_at) ",
        );
        insert.push_values(chunk, |mut row, order| {
            let (request_id, at_ms) = match order.reserved {
                SaleEvent::Reserved {
                    request_id, at_ms, ..
                } => (request_id.as_str(), *at_ms),
                other => ("", other.at_ms()),
            };
            row.push_bind(order.reserved.order_id())
                .push_bind(order.reserved.goods_id())
                .push_bind(order.reserved.user_id())
                .push_bind(order.reserved.quantity())
                .push_bind(request_id)
                .push_bind(order.state)
                .push_bind(order.reason)
                .push_bind(order.returned)
                .push_bind(timestamp(at_ms));
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Moves a goods' counters by `delta`; returns the rows matched (0: no such sale).
async fn update_sale(
    tx: &mut Transaction<'_, MySql>,
    goods_id: &str,
    delta: &Effect,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE sales SET stock = stock + ?, reserved = reserved + ?, sold = sold + ?, \
         lapsed = lapsed + ? WHERE goods_id = ?",
    )
    .bind(delta.available)
    .bind(delta.reserved)
    .bind(delta.sold)
    .bind(delta.lapsed)
    .bind(goods_id)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

/// An order's state as MySQL has it, and whether this batch changed it.
#[derive(Debug, Clone)]
struct Known {
    state: String,
    changed: Option<(&'static str, Option<String>, Option<bool>)>,
}

/// The careful path: locks the orders and sales the batch touches, walks the events in order
/// against what MySQL holds, applies only what is new and allowed, and reports the rest.
async fn apply_checked(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<(Applied, Vec<(usize, String)>), sqlx::Error> {
    let mut applied = Applied::default();
    let mut refused = Vec::new();
    let mut tx = mysql.begin().await?;
    let mut known = existing_orders(&mut tx, events).await?;
    let mut stock = sale_stock(&mut tx, events).await?;
    let mut deltas: HashMap<&str, Effect> = HashMap::new();
    let mut inserted: Vec<NewOrder> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let order_id = event.order_id();
        let goods_id = event.goods_id();
        let quantity = i64::from(event.quantity());
        let Some(left) = stock.get_mut(goods_id) else {
            refused.push((index, format!("no sale for goods {goods_id} in MySQL")));
            continue;
        };
        let current = known.get(order_id).map(|k| k.state.clone());
        let next: Result<Option<NewState>, String> = match (event, current.as_deref()) {
            (SaleEvent::Reserved { .. }, Some(_)) => Ok(None),
            (SaleEvent::Reserved { .. }, None) if *left < quantity => Err(format!(
                "goods {goods_id}: MySQL stock {left} is below {quantity}; reconcile"
            )),
            (SaleEvent::Reserved { .. }, None) => Ok(Some(NewState::Inserted)),
            (SaleEvent::Confirmed { .. }, Some("reserved")) => {
                Ok(Some(NewState::Changed("confirmed", None, None)))
            }
            (SaleEvent::Confirmed { .. }, Some("confirmed")) => Ok(None),
            (SaleEvent::Released { .. } | SaleEvent::Lapsed { .. }, Some("reserved")) => {
                let release = event.release();
                Ok(Some(NewState::Changed(
                    "released",
                    release.map(|(reason, _)| reason.as_str().to_owned()),
                    release.map(|(_, returned)| returned),
                )))
            }
            (SaleEvent::Released { .. } | SaleEvent::Lapsed { .. }, Some("released")) => Ok(None),
            (_, None) => Err(format!("order {order_id} is not in MySQL")),
            (_, Some(state)) => Err(format!(
                "order {order_id} is {state}; it cannot take this event"
            )),
        };
        match next {
            Err(reason) => refused.push((index, reason)),
            Ok(None) => applied.duplicates += 1,
            Ok(Some(change)) => {
                let effect = event.effect();
                *left += effect.available;
                add(deltas.entry(goods_id).or_default(), effect);
                match change {
                    NewState::Inserted => {
                        known.insert(
                            order_id.to_owned(),
                            Known {
                                state: "reserved".into(),
                                changed: None,
                            },
                        );
                        inserted.push(NewOrder::reserved(event));
                        applied.new_orders += 1;
                    }
                    NewState::Changed(state, reason, returned) => {
                        // An order inserted by this very batch is written in its final state.
                        if let Some(row) = inserted
                            .iter_mut()
                            .find(|o| o.reserved.order_id() == order_id)
                        {
                            row.state = state;
                            row.reason = event.release().map(|(reason, _)| reason.as_str());
                            row.returned = returned;
                        } else if let Some(k) = known.get_mut(order_id) {
                            k.changed = Some((state, reason, returned));
                        }
                        if let Some(k) = known.get_mut(order_id) {
                            k.state = state.to_owned();
                        }
                        applied.transitions += 1;
                    }
                }
            }
        }
    }
    insert_orders(&mut tx, &inserted).await?;
    for (order_id, k) in &known {
        if let Some((state, reason, returned)) = &k.changed {
            sqlx::query(
                "UPDATE orders SET state = ?, release_reason = ?, stock_returned = ? \
                 WHERE order_id = ?",
            )
            .bind(state)
            .bind(reason)
            .bind(returned)
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        }
    }
    // One UPDATE per goods per batch, whatever the number of orders.
    for (goods_id, delta) in &deltas {
        update_sale(&mut tx, goods_id, delta).await?;
    }
    tx.commit().await?;
    crashpoint(WRITER_AFTER_DB_COMMIT);
    Ok((applied, refused))
}

enum NewState {
    Inserted,
    Changed(&'static str, Option<String>, Option<bool>),
}

/// The orders of the batch MySQL already has, locked, with their state.
async fn existing_orders(
    tx: &mut Transaction<'_, MySql>,
    events: &[&SaleEvent],
) -> Result<HashMap<String, Known>, sqlx::Error> {
    let mut existing = HashMap::new();
    for chunk in events.chunks(INSERT_ROWS_MAX) {
        let mut select =
            QueryBuilder::<MySql>::new("SELECT order_id, state FROM orders WHERE order_id IN (");
        let mut ids = select.separated(", ");
        for event in chunk {
            ids.push_bind(event.order_id());
        }
        select.push(") FOR UPDATE");
        for row in select.build().fetch_all(&mut **tx).await? {
            existing.insert(
                row.try_get::<String, _>(0)?,
                Known {
                    state: row.try_get(1)?,
                    changed: None,
                },
            );
        }
    }
    Ok(existing)
}

/// Locks the sale rows the batch touches and returns their stock.
async fn sale_stock(
    tx: &mut Transaction<'_, MySql>,
    events: &[&SaleEvent],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let goods: HashSet<&str> = events.iter().map(|e| e.goods_id()).collect();
    let mut select =
        QueryBuilder::<MySql>::new("SELECT goods_id, stock FROM sales WHERE goods_id IN (");
    let mut ids = select.separated(", ");
    for goods_id in &goods {
        ids.push_bind(*goods_id);
    }
    select.push(") ORDER BY goods_id FOR UPDATE");
    let mut stock = HashMap::new();
    for row in select.build().fetch_all(&mut **tx).await? {
        stock.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
    }
    Ok(stock)
}

fn timestamp(at_ms: i64) -> chrono::NaiveDateTime {
    chrono::DateTime::from_timestamp_millis(at_ms)
        .unwrap_or_default()
        .naive_utc()
}

/// Commits, per partition, the offset after the last message of the batch.
fn commit_offsets(consumer: &StreamConsumer, batch: &[OwnedMessage]) -> anyhow::Result<()> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for message in batch {
        let offset = next
            .entry((message.topic(), message.partition()))
            .or_insert(0);
        *offset = (*offset).max(message.offset() + 1);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    tokio::task::block_in_place(|| consumer.commit(&list, CommitMode::Sync))
        .map_err(|e| anyhow::anyhow!("offset commit failed: {e}"))
}

/// Messages in the assigned partitions not yet consumed (high watermark minus position).
fn consumer_lag(consumer: &StreamConsumer) -> Option<i64> {
    let position = consumer.position().ok()?;
    let mut lag = 0;
    for element in position.elements() {
        let (_, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(element.topic(), element.partition(), KAFKA_CALL_TIMEOUT)
        })
        .ok()?;
        if let Offset::Offset(at) = element.offset() {
            lag += (high - at).max(0);
        }
    }
    Some(lag)
}
