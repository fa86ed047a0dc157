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
use crate::events::SaleEvent;
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
                    metrics::counter!("seckill_writer_duplicates_total")
                        .increment(applied.duplicates as u64);
                    return Some(applied);
                }
                Err(e) => {
                    metrics::counter!("seckill_writer_errors_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, events = batch.len(), "batch not applied; offsets not committed");
                }
            }
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

/// Applies sale events to MySQL in one transaction: inserts the orders that are really new
/// and updates each goods' counters once. Returns what was applied and, by index into
/// `events`, the events refused for their content (no such sale in MySQL; more than MySQL's
/// stock, which means drift). Public so the benchmark measures exactly the writer's apply.
pub async fn apply_events(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<(Applied, Vec<(usize, String)>), sqlx::Error> {
    match apply_fresh(mysql, events).await {
        Ok(Some(applied)) => return Ok((applied, Vec::new())),
        // Something in the batch is not plainly new (a redelivery, an unknown goods, stock
        // MySQL does not have): the careful path sorts it out event by event.
        Ok(None) | Err(sqlx::Error::Database(_)) => {}
        Err(e) => return Err(e),
    }
    apply_checked(mysql, events).await
}

/// The common case, in three statements: every event is a new order for a known goods with
/// stock to cover it. The order id's primary key and the `stock >= 0` check make MySQL refuse
/// the transaction otherwise (`Err(Database)`), as does a goods without a sale row
/// (`Ok(None)`); nothing is committed then.
async fn apply_fresh(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<Option<Applied>, sqlx::Error> {
    let mut seen = HashSet::with_capacity(events.len());
    if !events.iter().all(|e| seen.insert(e.order_id())) {
        return Ok(None);
    }
    let mut tx = mysql.begin().await?;
    insert_orders(&mut tx, events).await?;
    let mut taken: HashMap<&str, i64> = HashMap::new();
    for event in events {
        let SaleEvent::Reserved {
            goods_id, quantity, ..
        } = event;
        *taken.entry(goods_id.as_str()).or_default() += i64::from(*quantity);
    }
    for (goods_id, quantity) in &taken {
        if update_sale(&mut tx, goods_id, *quantity).await? != 1 {
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

async fn insert_orders(
    tx: &mut Transaction<'_, MySql>,
    rows: &[&SaleEvent],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(INSERT_ROWS_MAX) {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT INTO orders (order_id, goods_id, user_id, quantity, request_id, state, reserved_at) ",
        );
        insert.push_values(chunk, |mut row, event| {
            let SaleEvent::Reserved {
                order_id,
                goods_id,
                user_id,
                quantity,
                request_id,
                at_ms,
            } = event;
            row.push_bind(order_id)
                .push_bind(goods_id)
                .push_bind(user_id)
                .push_bind(quantity)
                .push_bind(request_id)
                .push_bind("reserved")
                .push_bind(timestamp(*at_ms));
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Moves `quantity` units of a goods from MySQL's stock to reserved; returns rows matched.
async fn update_sale(
    tx: &mut Transaction<'_, MySql>,
    goods_id: &str,
    quantity: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE sales SET stock = stock - ?, reserved = reserved + ? WHERE goods_id = ?",
    )
    .bind(quantity)
    .bind(quantity)
    .bind(goods_id)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

/// The careful path: reads which orders MySQL already has and what stock each goods has, and
/// applies only what is new and covered; the rest is skipped (duplicates) or refused.
async fn apply_checked(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<(Applied, Vec<(usize, String)>), sqlx::Error> {
    let mut applied = Applied::default();
    let mut refused = Vec::new();
    if events.is_empty() {
        return Ok((applied, refused));
    }
    let mut tx = mysql.begin().await?;
    let existing = existing_orders(&mut tx, events).await?;
    let mut seen = HashSet::new();
    let mut fresh = Vec::new();
    for (index, event) in events.iter().enumerate() {
        if existing.contains(event.order_id()) || !seen.insert(event.order_id()) {
            applied.duplicates += 1;
        } else {
            fresh.push((index, *event));
        }
    }
    let mut stock = sale_stock(&mut tx, &fresh).await?;
    let mut taken: HashMap<&str, i64> = HashMap::new();
    let mut rows = Vec::with_capacity(fresh.len());
    for (index, event) in fresh {
        let SaleEvent::Reserved {
            goods_id, quantity, ..
        } = event;
        match stock.get_mut(goods_id.as_str()) {
            None => refused.push((index, format!("no sale for goods {goods_id} in MySQL"))),
            Some(left) if *left < i64::from(*quantity) => refused.push((
                index,
                format!("goods {goods_id}: MySQL stock {left} is below {quantity}; reconcile"),
            )),
            Some(left) => {
                *left -= i64::from(*quantity);
                *taken.entry(goods_id.as_str()).or_default() += i64::from(*quantity);
                rows.push(event);
            }
        }
    }
    insert_orders(&mut tx, &rows).await?;
    // One UPDATE per goods per batch, whatever the number of orders.
    for (goods_id, quantity) in &taken {
        update_sale(&mut tx, goods_id, *quantity).await?;
    }
    tx.commit().await?;
    crashpoint(WRITER_AFTER_DB_COMMIT);
    applied.new_orders = rows.len();
    Ok((applied, refused))
}

async fn existing_orders(
    tx: &mut Transaction<'_, MySql>,
    events: &[&SaleEvent],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut existing = HashSet::new();
    for chunk in events.chunks(INSERT_ROWS_MAX) {
        let mut select =
            QueryBuilder::<MySql>::new("SELECT order_id FROM orders WHERE order_id IN (");
        let mut ids = select.separated(", ");
        for event in chunk {
            ids.push_bind(event.order_id());
        }
        select.push(")");
        for row in select.build().fetch_all(&mut **tx).await? {
            existing.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(existing)
}

/// Locks the sale rows the batch touches and returns their stock.
async fn sale_stock(
    tx: &mut Transaction<'_, MySql>,
    events: &[(usize, &SaleEvent)],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let goods: HashSet<&str> = events.iter().map(|(_, e)| e.goods_id()).collect();
    if goods.is_empty() {
        return Ok(HashMap::new());
    }
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
