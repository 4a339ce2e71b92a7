-- What every API replica must agree on about IDE access, kept until it would have expired anyway:
-- IDE tokens already exchanged for a session (a token opens one session, on whichever replica),
-- and IDE sessions ended by logout (refused on every replica, not only the one that ended them).
CREATE TABLE ide_used_tokens (
    token_id   TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX ide_used_tokens_expiry ON ide_used_tokens(expires_at);
CREATE TABLE ide_revoked_sessions (
    session_id TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX ide_revoked_sessions_expiry ON ide_revoked_sessions(expires_at);
