-- The API session each IDE token and IDE session was opened from (by its id, the token's jti), kept
-- until the IDE token or session would have expired anyway. An IDE session lives only as long as
-- the API session it came from: signing out of the API ends it on every replica.
CREATE TABLE ide_session_origins (
    id             TEXT PRIMARY KEY,
    api_session_id TEXT NOT NULL,
    expires_at     BIGINT NOT NULL
);
CREATE INDEX ide_session_origins_api_session ON ide_session_origins(api_session_id);
CREATE INDEX ide_session_origins_expiry ON ide_session_origins(expires_at);
