-- The `redis_sharded` tier: how many shards (keyspaces in different Redis Cluster hash tags)
-- a goods' stock is split over. NULL for every other tier. Portable SQL (MariaDB and MySQL 8).
ALTER TABLE sales
    ADD COLUMN shards TINYINT UNSIGNED NULL AFTER fleet_burst;
