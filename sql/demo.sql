-- pgcache demo schema: the seed's `users` and `products` tables, a few rows each.
-- Idempotent: it DROPs and re-creates both tables, so load it only into a
-- throw-away database (scripts/run.sh loads it into its own `pgcache_demo`).
--
--   psql -v ON_ERROR_STOP=1 -d pgcache_demo -f sql/demo.sql

SET client_min_messages = warning;  -- no NOTICEs from DROP ... IF EXISTS

BEGIN;

DROP TABLE IF EXISTS users;
DROP TABLE IF EXISTS products;

CREATE TABLE users (
    id SERIAL PRIMARY KEY,
    name VARCHAR(100),
    email VARCHAR(200),
    created_at TIMESTAMP DEFAULT NOW()
);

-- Fixed timestamps so the rows (and the examples in README.md) are reproducible.
INSERT INTO users (id, name, email, created_at) VALUES
    (1, 'Alice', 'alice@example.com', '2026-01-15 09:30:00'),
    (2, 'Bob',   'bob@example.com',   '2026-01-16 14:05:00'),
    (3, 'Carol', 'carol@example.com', '2026-02-01 08:00:00'),
    (4, 'Dave',  'dave@example.com',  '2026-02-14 17:45:00'),
    (5, 'Erin',  'erin@example.com',  '2026-03-03 11:20:00');
SELECT setval(pg_get_serial_sequence('users', 'id'), (SELECT max(id) FROM users));

-- Composite primary key.
CREATE TABLE products (
    category VARCHAR(50),
    product_id INTEGER,
    name VARCHAR(200),
    price DECIMAL(10,2),
    PRIMARY KEY (category, product_id)
);

INSERT INTO products (category, product_id, name, price) VALUES
    ('electronics', 1,   'Laptop',           999.99),
    ('electronics', 2,   'Headphones',        79.50),
    ('electronics', 456, 'Phone',            599.00),
    ('books',       1,   'The Rust Book',     39.95),
    ('books',       2,   'PostgreSQL Notes',  24.00),
    ('garden',      7,   'Watering Can',      12.49);

COMMIT;
