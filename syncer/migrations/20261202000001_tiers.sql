-- Who decides a goods, and what MySQL needs to decide it itself (the `db` tier, and the
-- fallback while Redis is down or has forgotten).
--   tier          'redis' (Redis decides, the pipeline writes MySQL), 'db' (MySQL alone decides),
--                 'dual_write' (Redis decides; the winner's row is in MySQL before the answer).
--   mode          for redis and dual_write goods: 'redis' (Redis decides), 'fallback' (MySQL
--                 decides: Redis failed or forgot), 'switching' (a re-seed is loading Redis:
--                 nobody decides for that moment).
--   loaded_epoch  the last epoch known to be loaded into Redis: a Redis whose sale is missing
--                 or behind it has forgotten, and is not trusted until re-seeded.
--   db_seq        the sequence of order ids MySQL hands out itself, under `epoch`.
--   holdback      units MySQL does not sell in fallback: Redis may have sold them, and their
--                 events have not reached MySQL yet.
-- Portable SQL (MariaDB and MySQL 8): sqlx runs each migration exactly once.
ALTER TABLE sales
    ADD COLUMN tier         VARCHAR(16)     NOT NULL DEFAULT 'redis' AFTER payment_window_s,
    ADD COLUMN mode         VARCHAR(16)     NOT NULL DEFAULT 'redis' AFTER tier,
    ADD COLUMN loaded_epoch BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER round_epoch,
    ADD COLUMN db_seq       BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER loaded_epoch,
    ADD COLUMN holdback     BIGINT          NOT NULL DEFAULT 0 AFTER db_seq;

-- Every epoch handed out before this migration was loaded into Redis (or was meant to be).
UPDATE sales SET loaded_epoch = epoch;

-- MySQL decides per goods by request id (idempotent retries) and by buyer (the per-user
-- limit): these two lookups need their indexes. claim_by: until when an order MySQL decided
-- waits for the gate's claim (NULL: claimed, or delivered by the answer itself).
ALTER TABLE orders
    ADD COLUMN claim_by DATETIME(3) NULL AFTER stock_returned,
    ADD INDEX orders_by_request (goods_id, request_id),
    ADD INDEX orders_by_buyer (goods_id, user_id);
