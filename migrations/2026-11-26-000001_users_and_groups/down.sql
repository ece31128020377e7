DROP TABLE group_members;
DROP TABLE groups;
DROP TABLE users;
-- pg_trgm stays: other schemas of the database may use it.
