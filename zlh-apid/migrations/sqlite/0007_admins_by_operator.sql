-- Admins used to be made by registering (or signing in with) an address named in the config's
-- admin_emails, which nobody verified: such a role cannot be trusted. Every admin becomes a plain
-- user; the operator names admins again with `zlh-apid admin grant <email>`.
-- Keep in step with migrations/postgres/0007_admins_by_operator.sql.

UPDATE users SET role = 'user' WHERE role = 'admin';
