-- A goods' attempt rate for the whole fleet of gates, counted in Redis in the deduct call
-- (GCRA): NULL for none. Portable SQL (MariaDB and MySQL 8).
ALTER TABLE sales
    ADD COLUMN fleet_rate_per_s INT UNSIGNED NULL AFTER tier,
    ADD COLUMN fleet_burst      INT UNSIGNED NULL AFTER fleet_rate_per_s;
