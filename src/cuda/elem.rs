//! The element types device buffers hold (driver and emulated alike).

/// Element types a device buffer may hold: plain data whose every bit pattern is a value (so an
/// all-zero or 0xFF-filled buffer is valid, and bytes copy in and out unchanged).
pub trait DeviceElem:
    cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
    /// The element's name in launch errors.
    const NAME: &'static str;
}

impl DeviceElem for f32 {
    const NAME: &'static str = "f32";
}
impl DeviceElem for f64 {
    const NAME: &'static str = "f64";
}
impl DeviceElem for i32 {
    const NAME: &'static str = "i32";
}
impl DeviceElem for u8 {
    const NAME: &'static str = "u8";
}
