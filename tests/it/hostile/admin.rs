//! Hostile input: admin. (Tests follow.)
