//! Attacks by a hostile cluster user on the privileged parts of the product,
//! each with a harmless marker: one module per thing attacked.

mod criu;
