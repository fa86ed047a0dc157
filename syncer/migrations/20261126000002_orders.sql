-- Orders as the batched writer records them, one row per order id (the primary key makes a
-- redelivered event a no-op), and the sale's reserved and sold counters, so that MySQL keeps
-- total_stock = stock + reserved + sold like Redis does.
-- Portable SQL (MariaDB and MySQL 8): sqlx runs each migration exactly once, so a plain
-- ADD COLUMN is safe. Edited before the first release to drop MariaDB-only IF NOT EXISTS;
-- sqlx's checksum then refuses a database that applied the old text ("previously applied but
-- has been modified"): recreate such a database (the demo recreates seckill_demo each run).
CREATE TABLE IF NOT EXISTS orders (
    order_id     VARCHAR(128)     NOT NULL PRIMARY KEY,
    goods_id     VARCHAR(128)     NOT NULL,
    user_id      VARCHAR(128)     NOT NULL,
    quantity     INT UNSIGNED     NOT NULL,
    request_id   VARCHAR(128)     NOT NULL,
    state        VARCHAR(16)      NOT NULL,
    reserved_at  DATETIME(3)      NOT NULL,
    -- When the writer applied the event: reserved_at to written_at is the pipeline's lag.
    written_at   DATETIME(3)      NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at   DATETIME(3)      NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)
    -- No secondary index: inserts are the hot path, and an order id starts with its goods id
    -- (goods.epoch.sequence), so per-goods queries range-scan the primary key.
) ENGINE = InnoDB;

ALTER TABLE sales
    ADD COLUMN reserved BIGINT NOT NULL DEFAULT 0 AFTER stock,
    ADD COLUMN sold     BIGINT NOT NULL DEFAULT 0 AFTER reserved;
