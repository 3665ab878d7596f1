//! Kong 3.10's `traditional_compatible` router.
