//! PEFT methods, one file each. A method implements [`crate::model::Hooks`]
//! (where it enters the graph) and [`Trainable`] (what the trainer updates).

pub mod lora;

use crate::ggml::{Tensor, TensorStore};
use crate::rng::Rng;

/// What the trainer needs from a method: its trainable tensors (F32, on the
/// model's backend) and the per-step random inputs it adds to the graph.
pub trait Trainable: crate::model::Hooks {
    /// The store holding every trainable tensor.
    fn store(&self) -> &TensorStore;

    /// Names of the trainable tensors, in a fixed order.
    fn param_names(&self) -> Vec<String>;

    /// The trainable tensors, in `param_names` order.
    fn params(&self) -> Vec<Tensor<'_>> {
        self.param_names()
            .iter()
            .map(|n| self.store().get(n).expect("param exists"))
            .collect()
    }

    /// Total number of trainable values.
    fn n_trainable(&self) -> usize {
        self.params().iter().map(|t| t.n_elements()).sum()
    }

    /// Switches training-only behaviour (dropout) on or off; `rng` draws the
    /// masks of the graphs built while on.
    fn set_training(&self, rng: Option<Rng>);

    /// The generator state after the masks drawn so far (for checkpoints).
    fn training_rng(&self) -> Option<Rng>;

    /// Starts a new batch: random inputs are drawn afresh (graphs rebuilt
    /// for the same batch reuse them).
    fn new_batch(&self) {}
}
