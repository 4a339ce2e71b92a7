-- zlh-apid schema. Times are unix milliseconds; ids are 128-bit random hex. Keep in step with
-- migrations/postgres/0001_init.sql.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,   -- lowercased
    username      TEXT NOT NULL UNIQUE,   -- lowercased
    password_hash TEXT NOT NULL,          -- argon2id PHC string
    role          TEXT NOT NULL DEFAULT 'user',
    created_at    BIGINT NOT NULL
);

CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,          -- the session token's jti
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX sessions_user ON sessions(user_id);

-- Failed logins by key (identifier, client address), shared by every API replica.
CREATE TABLE login_attempts (
    key TEXT NOT NULL,
    at  BIGINT NOT NULL
);
CREATE INDEX login_attempts_key ON login_attempts(key, at);

CREATE TABLE servers (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL REFERENCES users(id),
    kind             TEXT NOT NULL,       -- game | dev
    name             TEXT NOT NULL,
    plan             TEXT NOT NULL,
    vmid             BIGINT,              -- set once allocated
    spec             TEXT NOT NULL,       -- JSON: what the user asked for
    state            TEXT NOT NULL,       -- provisioning | running | stopped | failed | suspended | deleting | deleted
    agent_url        TEXT,
    code_server_addr TEXT,
    agent_status     TEXT NOT NULL DEFAULT 'unknown',  -- online | offline | unknown
    agent_last_seen  BIGINT,
    last_status      TEXT,                -- JSON of the agent's last /status
    error            TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    deleted_at       BIGINT
);
CREATE INDEX servers_user ON servers(user_id);

-- Allocation is a unique insert: two replicas racing for one number cannot both win.
CREATE TABLE vmid_leases (
    vmid      BIGINT PRIMARY KEY,
    server_id TEXT NOT NULL UNIQUE
);
CREATE TABLE port_leases (
    port      BIGINT PRIMARY KEY,
    server_id TEXT NOT NULL
);
CREATE INDEX port_leases_server ON port_leases(server_id);

-- Provisioning and deletion as persisted jobs, claimed by one replica at a time through a lease.
CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,
    server_id   TEXT NOT NULL REFERENCES servers(id),
    kind        TEXT NOT NULL,            -- provision | delete
    state       TEXT NOT NULL,            -- queued | running | done | failed
    step        TEXT,
    steps       TEXT NOT NULL DEFAULT '[]', -- JSON [{step, state, at, error}]
    error       TEXT,
    attempts    BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until BIGINT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_server ON jobs(server_id);

CREATE TABLE subscriptions (
    user_id         TEXT PRIMARY KEY REFERENCES users(id),
    plan            TEXT NOT NULL,        -- basic | standard | pro
    status          TEXT NOT NULL,        -- active | inactive | past_due | canceled | suspended
    customer_id     TEXT,
    subscription_id TEXT,
    past_due_since  BIGINT,
    updated_at      BIGINT NOT NULL
);

-- Payment provider events already handled (webhooks are retried; handling is idempotent).
CREATE TABLE billing_events (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
