//! The plugins the data plane executes.
