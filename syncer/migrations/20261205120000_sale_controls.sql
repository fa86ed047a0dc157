-- Sale controls (`control/`): pause, resume, stop and add stock to a live sale. MySQL is the
-- record: a control is written here first, then into Redis (each shard's sale hash), and every
-- load of a sale into Redis (preheat, re-seed) carries what MySQL says.
--   paused_at      when the sale was paused (NULL: not paused); nothing is decided while set.
--   pause_retry_s  the Retry-After a paused sale answers buyers with (NULL: not paused).
--   stopped_at     when an operator stopped the sale (NULL: not stopped); a stop also moves
--                  ends_at to that moment, so every end-of-sale rule applies from then on.
-- Portable SQL (MariaDB and MySQL 8): sqlx runs each migration exactly once.
ALTER TABLE sales
    ADD COLUMN paused_at     DATETIME(3)  NULL AFTER holdback,
    ADD COLUMN pause_retry_s INT UNSIGNED NULL AFTER paused_at,
    ADD COLUMN stopped_at    DATETIME(3)  NULL AFTER pause_retry_s;

-- Stock added to a sale, one row per operation id: a retried add-stock with the same id adds
-- nothing twice (the row is the proof it was added), and a different quantity under the same
-- id is refused.
--   epoch          the goods' epoch (sales.epoch) when MySQL added the units: a load of
--                  Redis under a later epoch read them from MySQL already; Redis's sale under
--                  this very epoch takes them from the operation itself.
--   redis_done_at  when Redis took the units, or was found not to need them (NULL: not yet;
--                  the same add-stock again completes it).
CREATE TABLE IF NOT EXISTS stock_additions (
    goods_id       VARCHAR(128)    NOT NULL,
    operation_id   VARCHAR(128)    NOT NULL,
    quantity       BIGINT UNSIGNED NOT NULL,
    epoch          BIGINT UNSIGNED NOT NULL,
    created_at     DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    redis_done_at  DATETIME(3)     NULL,
    PRIMARY KEY (goods_id, operation_id)
) ENGINE = InnoDB;
