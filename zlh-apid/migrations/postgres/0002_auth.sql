-- Login rate limiting: each attempt row gets an id so a request can take back its own
-- reservation once the password proved right, and pruning by age uses an index.
-- Keep in step with migrations/sqlite/0002_auth.sql.

ALTER TABLE login_attempts ADD COLUMN id TEXT;
CREATE INDEX login_attempts_at ON login_attempts(at);
