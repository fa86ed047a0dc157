-- Sale definitions. MySQL is the source of truth for what is on sale; Redis holds the live
-- counters while the sale runs (see README, "Sources of truth").
CREATE TABLE IF NOT EXISTS sales (
    goods_id        VARCHAR(128)    NOT NULL PRIMARY KEY,
    total_stock     BIGINT UNSIGNED NOT NULL,
    -- Units not yet sold according to MySQL; the batched writer lowers it as sales arrive.
    stock           BIGINT          NOT NULL,
    per_user_limit  INT UNSIGNED    NOT NULL,
    starts_at       DATETIME(3)     NOT NULL,
    ends_at         DATETIME(3)     NOT NULL,
    created_at      DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at      DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    CONSTRAINT stock_not_negative CHECK (stock >= 0),
    CONSTRAINT stock_within_total CHECK (stock <= total_stock)
) ENGINE = InnoDB;
