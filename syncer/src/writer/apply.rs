//! The writer's MySQL side: applies a batch of sale events in one transaction. The rules for
//! each event live in [`seckill_model::transition`]; this module reads the rows they need, and
//! writes what they decided.

use std::collections::{HashMap, HashSet};

use sqlx::{MySql, MySqlPool, QueryBuilder, Row as _, Transaction};

use seckill_model::transition::{transition, Purchase, Row, Step};

use crate::crashpoint::{crashpoint, WRITER_AFTER_DB_COMMIT};
use crate::events::{Effect, SaleEvent};
use crate::order::OrderState;

/// Rows per multi-row INSERT (9 values each) or per `IN (...)` list: far below MySQL's 65,535
/// placeholders.
const INSERT_ROWS_MAX: usize = 1_000;

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub new_orders: usize,
    /// When each new order was reserved (its event's `at_ms`, by Redis's clock): the writer's
    /// deduct-to-MySQL latency.
    pub new_orders_reserved_at_ms: Vec<i64>,
    /// Orders moved from reserved to confirmed or released.
    pub transitions: usize,
    pub duplicates: usize,
    pub dead_letters: usize,
}

impl Applied {
    /// Adds what another transaction of the same batch did.
    pub fn absorb(&mut self, other: Applied) {
        self.new_orders += other.new_orders;
        self.new_orders_reserved_at_ms
            .extend(other.new_orders_reserved_at_ms);
        self.transitions += other.transitions;
        self.duplicates += other.duplicates;
        self.dead_letters += other.dead_letters;
    }
}

/// An event the batch did not apply, by index into the batch's events, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub reason: String,
    /// The event names an order MySQL holds for another purchase (see [`Step::Conflict`]).
    pub conflict: bool,
}

/// Applies sale events to MySQL in one transaction: inserts the orders that are really new,
/// moves orders along their life (reserved -> confirmed or released), and updates each goods'
/// counters once. Returns what was applied and the events refused for their content (no such
/// sale or order in MySQL; more units than MySQL's stock, which means drift; a transition the
/// order cannot make; another purchase under an order id MySQL holds, a conflict). Public so
/// the benchmark measures exactly the writer's apply.
pub async fn apply_events(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<(Applied, Vec<Refused>), sqlx::Error> {
    if events.is_empty() {
        return Ok((Applied::default(), Vec::new()));
    }
    match apply_fresh(mysql, events).await {
        Ok(Some(applied)) => return Ok((applied, Vec::new())),
        // Something in the batch is not a plainly new reservation (a redelivery, a state
        // change, an unknown goods, stock MySQL does not have): the careful path sorts it out.
        Ok(None) => {}
        Err(sqlx::Error::Database(e)) if super::refuses_the_data(e.as_ref()) => {}
        // A lock wait, a deadlock, a server going away: the careful path would meet it again
        // (a lock wait twice over); the caller retries the whole batch instead.
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
        *deltas.entry(event.goods_id()).or_default() += event.effect();
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
        new_orders_reserved_at_ms: events.iter().map(|e| e.at_ms()).collect(),
        ..Applied::default()
    }))
}

/// An order row as the batch leaves it.
#[derive(Debug, Clone)]
struct NewOrder<'a> {
    reserved: &'a SaleEvent,
    row: Row,
}

impl<'a> NewOrder<'a> {
    fn reserved(event: &'a SaleEvent) -> Self {
        NewOrder {
            reserved: event,
            row: Row::after(event),
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
            let event = order.reserved;
            let request_id = event.request_id().unwrap_or_default();
            row.push_bind(event.order_id())
                .push_bind(event.goods_id())
                .push_bind(event.user_id())
                .push_bind(event.quantity())
                .push_bind(request_id)
                .push_bind(order.row.state.as_str())
                .push_bind(order.row.release_reason.map(|r| r.as_str()))
                .push_bind(order.row.stock_returned)
                .push_bind(timestamp(event.at_ms()));
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

/// An order's state as MySQL has it (the text, when it is no state this writer knows), its
/// purchase, and the row this batch writes for it.
#[derive(Debug, Clone)]
struct Known {
    state: Result<OrderState, String>,
    purchase: Purchase,
    changed: Option<Row>,
}

/// The careful path: locks the orders and sales the batch touches, walks the events in order
/// against what MySQL holds, applies only what is new and allowed, and reports the rest.
async fn apply_checked(
    mysql: &MySqlPool,
    events: &[&SaleEvent],
) -> Result<(Applied, Vec<Refused>), sqlx::Error> {
    let mut applied = Applied::default();
    let mut refused = Vec::new();
    let mut tx = mysql.begin().await?;
    let mut known = existing_orders(&mut tx, events).await?;
    let mut stock = sale_stock(&mut tx, events).await?;
    let mut deltas: HashMap<&str, Effect> = HashMap::new();
    let mut inserted: Vec<NewOrder> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let (order_id, goods_id) = (event.order_id(), event.goods_id());
        let current = match known.get(order_id) {
            None => None,
            Some(Known {
                state: Ok(state),
                purchase,
                ..
            }) => Some((*state, purchase)),
            Some(Known {
                state: Err(text), ..
            }) => {
                let reason = format!(
                    "order {order_id} is in state {text:?}, which this writer does not know"
                );
                refused.push(Refused {
                    index,
                    reason,
                    conflict: false,
                });
                continue;
            }
        };
        let effect = match transition(event, current, stock.get(goods_id).copied()) {
            Step::Refuse(reason) => {
                refused.push(Refused {
                    index,
                    reason,
                    conflict: false,
                });
                continue;
            }
            Step::Conflict(reason) => {
                refused.push(Refused {
                    index,
                    reason,
                    conflict: true,
                });
                continue;
            }
            Step::Duplicate => {
                applied.duplicates += 1;
                continue;
            }
            Step::Insert { effect } => {
                let row = NewOrder::reserved(event);
                known.insert(
                    order_id.to_owned(),
                    Known {
                        state: Ok(row.row.state),
                        purchase: Purchase::of(event),
                        changed: None,
                    },
                );
                inserted.push(row);
                applied.new_orders += 1;
                applied.new_orders_reserved_at_ms.push(event.at_ms());
                effect
            }
            Step::Update { row, effect } => {
                // An order inserted by this very batch is written in its final state.
                if let Some(new) = inserted
                    .iter_mut()
                    .find(|o| o.reserved.order_id() == order_id)
                {
                    new.row = row;
                } else if let Some(k) = known.get_mut(order_id) {
                    k.changed = Some(row);
                }
                if let Some(k) = known.get_mut(order_id) {
                    k.state = Ok(row.state);
                }
                applied.transitions += 1;
                effect
            }
        };
        if let Some(left) = stock.get_mut(goods_id) {
            *left += effect.available;
        }
        *deltas.entry(goods_id).or_default() += effect;
    }
    insert_orders(&mut tx, &inserted).await?;
    for (order_id, k) in &known {
        if let Some(row) = &k.changed {
            sqlx::query(
                "UPDATE orders SET state = ?, release_reason = ?, stock_returned = ? \
                 WHERE order_id = ?",
            )
            .bind(row.state.as_str())
            .bind(row.release_reason.map(|r| r.as_str()))
            .bind(row.stock_returned)
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

/// The orders of the batch MySQL already has, locked, with their state and purchase.
async fn existing_orders(
    tx: &mut Transaction<'_, MySql>,
    events: &[&SaleEvent],
) -> Result<HashMap<String, Known>, sqlx::Error> {
    let mut existing = HashMap::new();
    for chunk in events.chunks(INSERT_ROWS_MAX) {
        let mut select = QueryBuilder::<MySql>::new(
            "SELECT order_id, state, user_id, request_id, quantity FROM orders \
             WHERE order_id IN (",
        );
        let mut ids = select.separated(", ");
        for event in chunk {
            ids.push_bind(event.order_id());
        }
        select.push(") FOR UPDATE");
        for row in select.build().fetch_all(&mut **tx).await? {
            let state: String = row.try_get(1)?;
            existing.insert(
                row.try_get::<String, _>(0)?,
                Known {
                    state: OrderState::parse(&state).ok_or(state),
                    purchase: Purchase {
                        user_id: row.try_get(2)?,
                        request_id: row.try_get(3)?,
                        quantity: row.try_get(4)?,
                    },
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
