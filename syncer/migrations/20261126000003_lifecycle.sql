-- Reservation lifecycle: a sale's payment window, why an order was released and whether its
-- units went back on sale, and units whose reservation ended after the sale closed.
-- Portable SQL (MariaDB and MySQL 8): sqlx runs each migration exactly once, so a plain
-- ADD COLUMN is safe. Edited before the first release to drop MariaDB-only IF NOT EXISTS;
-- sqlx's checksum then refuses a database that applied the old text ("previously applied but
-- has been modified"): recreate such a database (the demo recreates seckill_demo each run).
ALTER TABLE sales
    ADD COLUMN payment_window_s INT UNSIGNED NOT NULL DEFAULT 900 AFTER ends_at,
    ADD COLUMN lapsed BIGINT NOT NULL DEFAULT 0 AFTER sold;

ALTER TABLE orders
    ADD COLUMN release_reason VARCHAR(32) NULL AFTER state,
    ADD COLUMN stock_returned BOOLEAN NULL AFTER release_reason;
