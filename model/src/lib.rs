//! The syncer's data model: what an operator defines (a sale, the admin API's bodies), what
//! happens to an order (sale events and order states) and what an event does to an order's row
//! (the writer's rules). Pure parsing and checking, no I/O: the syncer uses these modules as its
//! own (`seckill_syncer::{admin, events, order, sale}`), and the fuzz targets (`fuzz/`) build
//! them without the syncer's stores.

pub mod admin;
pub mod events;
pub mod order;
pub mod sale;
pub mod transition;
