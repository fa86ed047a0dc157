-- Durable epochs. An order id is goods.epoch.sequence; the sequence lives in Redis and starts
-- again at 1 on every load of a sale, so the epoch must never be handed out twice, even when
-- Redis forgets (a restart without persistence, an AOF tail rolled back, a failover). MySQL
-- keeps it: every load of a sale into Redis first moves `epoch` forward here, in a
-- transaction, and only then loads Redis with it.
--   epoch        the last epoch handed to Redis for this goods; it only ever grows.
--   round_epoch  the epoch at which the current definition was saved: orders whose epoch is
--                above it were sold under this definition (its "round"), and a sale with such
--                orders is never loaded with its full stock again.
-- Portable SQL (MariaDB and MySQL 8): sqlx runs each migration exactly once, so a plain
-- ADD COLUMN is safe.
ALTER TABLE sales
    ADD COLUMN epoch       BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER payment_window_s,
    ADD COLUMN round_epoch BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER epoch;

-- A database from before this migration: the epochs Redis handed out are in the order ids
-- MySQL holds (a preheat also takes Redis's own epoch counter into account, for epochs that
-- sold nothing MySQL has seen). round_epoch stays 0: every existing order counts as sold
-- under the current definition, the cautious reading.
UPDATE sales SET epoch = (
    SELECT COALESCE(MAX(CAST(SUBSTRING_INDEX(SUBSTRING_INDEX(orders.order_id, '.', -2), '.', 1)
        AS UNSIGNED)), 0)
    FROM orders
    WHERE orders.goods_id = sales.goods_id
);
