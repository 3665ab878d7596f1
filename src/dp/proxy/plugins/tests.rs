//! Unit tests of the plugins (see the Kong spec files cited per test).
