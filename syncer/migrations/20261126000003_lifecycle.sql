-- Reservation lifecycle: a sale's payment window, why an order was released and whether its
-- units went back on sale, and units whose reservation ended after the sale closed.
ALTER TABLE sales
    ADD COLUMN IF NOT EXISTS payment_window_s INT UNSIGNED NOT NULL DEFAULT 900 AFTER ends_at,
    ADD COLUMN IF NOT EXISTS lapsed BIGINT NOT NULL DEFAULT 0 AFTER sold;

ALTER TABLE orders
    ADD COLUMN IF NOT EXISTS release_reason VARCHAR(32) NULL AFTER state,
    ADD COLUMN IF NOT EXISTS stock_returned BOOLEAN NULL AFTER release_reason;
