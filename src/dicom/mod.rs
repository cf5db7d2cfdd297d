//! Pure DICOM vocabulary: character sets, the Part-10 envelope, one-pass
//! parsing into DICOM JSON and frame ranges, index summaries, lossless
//! re-encoding for the web. No I/O besides
//! reading the file it is handed.

pub mod charset;
pub mod coerce;
pub mod dataset;
pub mod part10;
pub mod rle;
pub mod storage_classes;
pub mod summary;
pub mod transcode;
